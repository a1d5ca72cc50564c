"""Teacher and student models: loading, saving, pruning, compatibility, and the pieces sampling and losses
use.

    heads.py     backbone / final_hidden / LMHead / lm_head_fn / position_ids_from_mask
    loading.py   load_model / load_tokenizer from a folder, a .gguf file, a built-in name or a hub id
    builtin.py   models shipped in pip packages (BUILTIN_MODELS) and their cache folder
    hub.py       Hugging Face hub access (offline mode, reachability, errors)
    saving.py    save_pretrained_atomic
    pruning.py   prune_model / pruned_layer_indices / prune_command (student initialisation)
    compat.py    check_compatibility / logit_width / slice_vocab (one shared id space)
    training.py  enable_checkpointing / set_train_mode / apply_lora (a student made ready to train)
"""

from minillm.models.builtin import BUILTIN_MODELS, BuiltinModel, cache_dir
from minillm.models.compat import check_compatibility, logit_width, slice_vocab
from minillm.models.heads import LMHead, backbone, final_hidden, lm_head_fn, position_ids_from_mask
from minillm.models.loading import builtin_model_dir, load_model, load_tokenizer
from minillm.models.pruning import prune_command, prune_model, pruned_layer_indices
from minillm.models.saving import save_pretrained_atomic
from minillm.models.training import apply_lora, enable_checkpointing, set_train_mode

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "LMHead",
    "apply_lora",
    "backbone",
    "builtin_model_dir",
    "cache_dir",
    "check_compatibility",
    "enable_checkpointing",
    "final_hidden",
    "lm_head_fn",
    "load_model",
    "load_tokenizer",
    "logit_width",
    "position_ids_from_mask",
    "prune_command",
    "prune_model",
    "pruned_layer_indices",
    "save_pretrained_atomic",
    "set_train_mode",
    "slice_vocab",
]
