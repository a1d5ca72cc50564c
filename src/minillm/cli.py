"""`minillm <command>`: the command-line interface.

Every training/generation/evaluation command takes `--config FILE.yaml` and overrides as `key=value`
(or `--key value`); `minillm <command> --help` lists every option with its documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from . import __version__
from .config import (
    DistillConfig,
    EvalConfig,
    GenerateConfig,
    MiniLLMConfig,
    OnPolicyConfig,
    SeqKDConfig,
    TeacherConfig,
    TrainConfig,
    build_config,
)
from .config.options import nested_groups, read_yaml
from .config.training import METHODS
from .errors import ConfigError, MiniLLMError, TrainingInterrupted

# `minillm sft` lists the base options; `minillm distill` adds the teacher and one group per method
COMMANDS = {
    "sft": ((TrainConfig,), "Supervised fine-tuning without KD (teacher SFT, student initialisation; "
                            "keeps the checkpoint with the lowest validation loss)."),
    "distill": ((TrainConfig, TeacherConfig, DistillConfig, SeqKDConfig, OnPolicyConfig, MiniLLMConfig),
                "Distil a teacher into a student: --method minillm (the paper), kd, seqkd, rkl, jsd, tvd, "
                "skl, srkl, onpolicy."),
    "generate": ((GenerateConfig,), "Answer every prompt of an instruction file with a model (JSONL out)."),
    "evaluate": ((EvalConfig,), "Generation-based evaluation over seeds: Rouge-L, exact match, length, "
                                "Dist-4; optional exposure bias and calibration."),
}


# = minillm.data.prepare.SETS, spelled out so that the parser does not import the data stack (start-up)
DATA_SETS = ("dolly", "selfinst", "vicuna", "sni", "unni")
PREPARE_HELP = """\
Turn one of the paper's instruction sets, in the format it is published in, into the project's
instruction JSONL (instruction, input, output, source, id + extra fields) that `minillm evaluate` and
the training commands read. Counts kept and dropped, and why, are printed; a bad input is an error
naming the file:line and the expected format, and nothing is written.

  dolly     SRC: databricks-dolly-15k.jsonl. --out is a FOLDER: train.jsonl, valid.jsonl, test.jsonl.
            In file order, after the prompt-length filter: the first 500 records are the test set
            (DollyEval), the next 1,000 validation, the rest training (as MiniLLM's released files).
  selfinst  SRC: self-instruct human_eval/user_oriented_instructions.jsonl; --out is a FILE. One
            example per instance (252), then the prompt-length filter (242 in the paper's release).
  vicuna    SRC: FastChat fastchat/eval/table/question.jsonl (or its folder); --out is a FILE. 80
            questions, references from --answers (default: answer/answer_gpt35.jsonl beside it,
            i.e. gpt-3.5-turbo's: the spec does not have MiniLLM use GPT-4 answers, and MiniLLM's
            released Vicuna references read as ChatGPT's, as the summary the spec cites says).
  sni       SRC: an allenai/natural-instructions checkout; --out is a FOLDER. The 119 test tasks of
            splits/default/test_tasks.txt, first 100 instances each, in files by the length of the
            longest reference: 0_5.jsonl, 6_10.jsonl, 11_.jsonl (the paper's tables use 11_).
  unni      SRC: Unnatural Instructions core_data.jsonl; --out is a FOLDER. A sample of 10,000
            instances (--seed), in the same length buckets.

SRC `hub` takes the authors' processed copy (MiniLLM/dolly, MiniLLM/self-inst, MiniLLM/Vicuna,
MiniLLM/sinst, MiniLLM/uinst) from the Hugging Face hub or its local cache, as released.
The paper's prompt-length filter and length buckets count tokens: pass --tokenizer (e.g. the
student's); without it the filter is off and the buckets count whitespace words.
"""


def _add_option(group, name: str, f: dataclasses.Field, aliases: tuple[str, ...] = ()) -> None:
    md = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    extra = f" Choices: {', '.join(md['choices'])}." if "choices" in md else ""
    flags = []
    for spelling in (name, *aliases):
        flags += [f"--{spelling}"] + ([f"--{spelling.replace('_', '-')}"] if "_" in spelling else [])
    is_bool = f.type in (bool, "bool")
    group.add_argument(*flags, dest=f"opt_{name}", default=argparse.SUPPRESS, metavar="V",
                       **({"nargs": "?", "const": "true"} if is_bool else {}),
                       help=f"{md.get('help', '')}{extra} (default: {default!r})")


def _own_fields(cls) -> list[dataclasses.Field]:
    """The fields `cls` adds to its parent config (all of them for a base config)."""
    parent = next((b for b in cls.__mro__[1:] if issubclass(b, TrainConfig)), None)
    inherited = {f.name for f in dataclasses.fields(parent)} if parent else set()
    return [f for f in dataclasses.fields(cls) if f.name not in inherited]


def _add_config_args(parser: argparse.ArgumentParser, classes: tuple[type, ...]) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (overridden by the "
                                                              "command line).")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. lr=1e-4")
    seen: set[str] = set()
    for i, cls in enumerate(classes):
        title = ("options (also settable as key=value or in the YAML file)" if i == 0 else
                 f"options of {cls.label()}" if cls.methods else "options of every method with a teacher")
        group = parser.add_argument_group(title)
        groups = nested_groups(cls)
        again = []
        for f in _own_fields(cls):
            if f.name in seen:  # shared with an earlier group (e.g. kd_ratio): its meaning here, in the title
                again.append(f"--{f.name} ({f.metadata.get('help', '').rstrip('.')})")
            elif f.name not in groups:
                seen.add(f.name)
                _add_option(group, f.name, f)
        if again:
            group.description = "Also reads " + "; ".join(again) + "."
        for head, sub in groups.items():
            if head in seen:
                continue
            seen.add(head)
            help_text = {f.name: f for f in dataclasses.fields(cls)}[head].metadata.get("help", "")
            nested = parser.add_argument_group(
                f"{head} options ({head}.<name>=V or <name>=V, or a `{head}:` mapping in YAML)", help_text)
            for f in dataclasses.fields(sub):
                if f"{head}.{f.name}" not in cls.refused:
                    _add_option(nested, f"{head}.{f.name}", f, aliases=(f.name,))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillm",
        description="MiniLLM: distil a large causal LM into a small one by minimising the reverse KL "
                    "(Gu et al., ICLR 2024), with the SFT/KD/SeqKD baselines and the paper's evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (classes, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p, classes)
    p = sub.add_parser("prune", help="Make a student by keeping K of a model's layers (embeddings, norms and "
                                     "head copied), saved as a plain HF folder.")
    p.add_argument("--model", required=True, help="model to prune (HF folder, .gguf, hub id, built-in name)")
    p.add_argument("--layers", type=int, required=True, help="number of decoder layers to keep")
    p.add_argument("--strategy", choices=("spread", "ends", "first"), default="spread",
                   help="spread: evenly spaced layers incl. first and last; ends: the first K/2 and the last "
                        "K/2 layers (drops one late-middle block; hurts least on SmolLM2); first: the "
                        "first K layers")
    p.add_argument("--out", required=True, help="output folder")
    p = sub.add_parser("quickstart", help="The whole MiniLLM pipeline on a real teacher "
                                          "(SmolLM2-135M-Instruct) in minutes on a CPU, ending in a report.")
    p.add_argument("--out", default="quickstart",
                   help="output folder (stages already done there are skipped)")
    p.add_argument("--budget", choices=("tiny", "small", "full"), default="small",
                   help="tiny: ~1-3 min (smoke test), small: ~8 min (default), full: larger (not yet "
                        "timed) - on 2 CPU cores")
    p.add_argument("--compare", action="store_true", help="also train the SFT, KD and SeqKD baselines")
    p.add_argument("--teacher", help="teacher: any causal LM with a chat template (model folder, .gguf, hub "
                                     "id); default the built-in SmolLM2-135M-Instruct")
    p.add_argument("--student", help="student sharing the teacher's tokenizer (folder, .gguf, hub id); "
                                     "default: the teacher pruned to the budget's number of layers")
    p = sub.add_parser("plan", help="Per-GPU memory of a run for each sharding option (DDP, ZeRO-2, FSDP2 "
                                    "with the teacher replicated or sharded, ZeRO-3), and a recommendation.",
                       description="Per-GPU memory of weights, gradients, AdamW state, activations, rollout "
                                   "KV caches and loss chunks for each sharding option, and the option with "
                                   "the least communication that fits (docs/planner.md).")
    p.add_argument("--config", metavar="FILE.yaml", help="take the method, models and settings from a "
                                                         "training config (the flags below override it)")
    p.add_argument("--teacher", help="teacher: model folder, config.json, .gguf, hub id (not needed for sft)")
    p.add_argument("--student", help="student: model folder, config.json, .gguf or hub id")
    p.add_argument("--method", choices=METHODS, help="training method (default: minillm, or the config's)")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (processes); default 8")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GiB; default 80")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of each GPU kept free; default 0.1")
    for name, kind in (("batch_size", int), ("max_length", int), ("rollout_batch_size", int),
                       ("max_prompt_length", int), ("max_new_tokens", int), ("num_rollouts", int),
                       ("chunk_size", int), ("lora_r", int), ("teacher_mix_alpha", float), ("pt_data", str),
                       ("pt_seq_len", int), ("kd_ratio", float)):
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"plan_{name}", type=kind, metavar="V",
                       help="as the training option (default: the config's or the method's default)")
    p.add_argument("--precision", dest="plan_precision", choices=("fp32", "bf16"))
    p.add_argument("--teacher-dtype", dest="plan_teacher_dtype", choices=("float32", "bfloat16", "float16"))
    for name in ("gradient_checkpointing", "fsdp_mixed_precision", "single_step"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"plan_{name}",
                       action=argparse.BooleanOptionalAction)
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes per device)")
    _add_data_parser(sub)
    p = sub.add_parser("report", help="Put several evaluation runs side by side (markdown table + PNG "
                                      "chart).")
    p.add_argument("runs", nargs="+", help="evaluation output folders (each with results.json)")
    p.add_argument("--out", default="report", help="output path prefix (writes PREFIX.md and PREFIX.png)")
    return parser


def _add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="Prepare the paper's instruction sets (Dolly, SelfInst, Vicuna, S-NI, "
                                    "UnNI) from their public files (`minillm data prepare`).")
    data_sub = p.add_subparsers(dest="data_command", metavar="subcommand")
    p = data_sub.add_parser("prepare", help="One of the paper's sets, from its public format, as instruction "
                                            "JSONL.", description=PREPARE_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_set", metavar="SET", choices=DATA_SETS, help=f"one of: {', '.join(DATA_SETS)}")
    p.add_argument("src", metavar="SRC", help="the set's public file (folder for sni), or `hub`")
    p.add_argument("--out", required=True, help="output file (selfinst, vicuna) or folder (dolly, sni, unni)")
    p.add_argument("--tokenizer", help="tokenizer that counts the paper's tokens (model folder, .gguf, hub "
                                       "id or built-in name); default: none (no prompt filter, buckets in "
                                       "words)")
    p.add_argument("--max-prompt-length", type=int, default=256,
                   help="dolly, selfinst: drop examples whose prompt has more tokens (default 256)")
    p.add_argument("--answers", help="vicuna: reference answer file (default: answer/answer_gpt35.jsonl "
                                     "beside question.jsonl)")
    p.add_argument("--instances-per-task", type=int, default=100,
                   help="sni: first instances kept per task (default 100)")
    p.add_argument("--sample-size", type=int, default=10_000,
                   help="unni: instances sampled (default 10000)")
    p.add_argument("--seed", type=int, default=42, help="unni: seed of the sample (default 42)")


def _overrides(args) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for item in args.overrides:
        if "=" not in item:
            raise MiniLLMError(f"expected key=value, got {item!r} (options: --help).")
        k, v = item.split("=", 1)
        overrides[k.strip().lstrip("-").replace("-", "_")] = v
    for k, v in vars(args).items():
        if not k.startswith("opt_"):
            continue
        k = k[4:]
        # argparse keeps no order between flags and key=value: refuse rather than guess which one was meant
        if k in overrides and str(overrides[k]) != str(v):
            raise ConfigError(f"command line: `{k}` is given twice with different values ({k}={overrides[k]} "
                              f"and --{k} {v}); give it once.")
        overrides[k] = v
    return overrides


def _resolve(cls, args) -> object:
    return build_config(cls, args.config, _overrides(args))


def _train_config(args) -> TrainConfig:
    """The config of `minillm sft` / `minillm distill`: the class of its method (see config_class)."""
    overrides = _overrides(args)
    method = overrides.get("method", read_yaml(args.config).get("method") if args.config else None)
    if args.command == "distill" and method in (None, "sft"):
        raise MiniLLMError("`minillm distill` needs --method (minillm, kd, seqkd, rkl, jsd, tvd, skl, srkl, "
                           "onpolicy); for plain fine-tuning use `minillm sft`.")
    cfg = build_config(TrainConfig, args.config, overrides)
    if args.command == "sft" and cfg.method != "sft":
        raise MiniLLMError(f"`minillm sft` trains without a teacher; got method={cfg.method} "
                           f"(use `minillm distill --method {cfg.method}`).")
    return cfg


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (see minillm {args.command or ''} --help)")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    if not args.command:
        parser.print_help()
        return 0
    _setup_logging()
    if args.command == "data":
        return _data(args)
    # Start-up: the training stack (torch, transformers) takes ~4 s to import against 0.1 s for this module,
    # so `minillm --help` and config errors stay instant; the same holds for prune/quickstart/report below.
    from . import api

    if args.command in ("sft", "distill"):
        print(f"model: {api.train(_train_config(args))}")
    elif args.command == "generate":
        print(f"wrote {api.generate(_resolve(GenerateConfig, args))}")
    elif args.command == "evaluate":
        out = api.evaluate(_resolve(EvalConfig, args))
        print(f"results: {out}")
    elif args.command == "prune":
        from .models import prune_command

        prune_command(args.model, args.layers, args.strategy, args.out)
    elif args.command == "quickstart":
        from .quickstart import quickstart

        report = quickstart(args.out, args.budget, args.compare, teacher=args.teacher, student=args.student)
        print(f"report: {report}")
    elif args.command == "plan":
        _plan(args)
    elif args.command == "report":
        from .evaluation.report import render_report

        render_report(args.runs, args.out + ".md", args.out + ".png")
        print(f"wrote {args.out}.md and {args.out}.png")
    return 0


def _data(args) -> int:
    """`minillm data prepare`: prints the report lines (counts kept and dropped, files written)."""
    if getattr(args, "overrides", None):
        raise MiniLLMError(f"minillm data prepare takes flags (see --help), not key=value: got "
                           f"{' '.join(args.overrides)}.")
    if args.data_command is None:
        build_parser().parse_args(["data", "--help"])  # prints the subcommands and exits
    from pathlib import Path

    from .data.prepare import Options, prepare, token_counter

    opts = Options(count_tokens=token_counter(args.tokenizer) if args.tokenizer else None,
                   max_prompt_length=args.max_prompt_length, seed=args.seed, sample_size=args.sample_size,
                   instances_per_task=args.instances_per_task,
                   answers=Path(args.answers).expanduser() if args.answers else None)
    for line in prepare(args.data_set, args.src, args.out, opts):
        print(line)
    return 0


def _plan(args) -> None:
    import json

    from .plan import format_plan, plan_memory

    if getattr(args, "overrides", None):
        raise MiniLLMError(f"minillm plan takes flags (--lora-r 8, --gradient-checkpointing, ...; see "
                           f"--help), not key=value: got {' '.join(args.overrides)}.")
    cfg = build_config(TrainConfig, args.config, {"method": args.method} if args.method else {}) \
        if args.config else None
    teacher = args.teacher or (getattr(cfg, "teacher", None) or None)
    student = args.student or (cfg.student if cfg is not None else None)
    method = cfg.method if cfg is not None else args.method or "minillm"
    if not student:
        raise MiniLLMError("minillm plan needs --student (a model folder or its config.json) or --config.")
    if method != "sft" and not teacher:
        raise MiniLLMError(f"method {method} needs --teacher (a model folder or its config.json).")
    settings = {k[5:]: v for k, v in vars(args).items() if k.startswith("plan_") and v is not None}
    plan = plan_memory(teacher, student, method, args.gpus, args.gpu_memory, config=cfg,
                       headroom=args.headroom, **settings)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))


def os_error_message(e: OSError) -> str:
    """An operating-system error as a user message: what failed, on which path, and what to do."""
    import errno

    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p) or "a file"
    what = e.strerror or str(e)
    hints = {errno.ENOSPC: "free disk space (or choose an output on another disk) and rerun; a training run "
                           "continues from its last checkpoint with resume=true",
             errno.EDQUOT: "free space within your disk quota and rerun (resume=true continues a run)",
             errno.EROFS: "the file system is read-only: choose a writable output location",
             errno.EACCES: "permission denied: choose a location you can write, or fix its permissions",
             errno.EPERM: "operation not permitted: choose a location you can write",
             errno.ENOENT: "the path does not exist: check the spelling",
             errno.EISDIR: "a folder is where a file is expected: give a file path",
             errno.ENOTDIR: "a file is where a folder is expected: give a folder path"}
    hint = hints.get(e.errno, "check the path and the file system")
    return f"{what}: {where} ({hint})."


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except MiniLLMError as e:
        print(f"minillm: error: {e}", file=sys.stderr)
        code = 2
    except TrainingInterrupted as e:
        print(f"minillm: {e}", file=sys.stderr)
        code = 130
    except OSError as e:  # the file system refused: say which path and what to do, not a traceback
        print(f"minillm: error: {os_error_message(e)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("minillm: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
