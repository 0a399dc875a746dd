"""Export a saved adapter for serving: a merged model folder or a PEFT LoRA folder, at a given c.

    python -m experiments.merge --model path/or/hub-name --adapter adapter.safetensors \\
        --out merged_model --c 1.0                      # plain weights (ml.merge_checkpoint)
    python -m experiments.merge --model ... --adapter ... --out peft_dir --format peft --c 1.0

``--c deployed`` uses the coefficient stored in the adapter file (``adapter.save(..., c=...)``).
The merged format works shard by shard on the saved folder (a hub name is resolved to its local
snapshot); the PEFT format loads the base model to rebuild the adapter (``modlora.checkpoint.load_adapter``).
"""

import argparse
import sys
from pathlib import Path

import modlora as ml
from modlora.checkpoint import load_adapter


def _coefficient(text: str) -> float | None:
    if text == "deployed":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--c must be a number or 'deployed', got {text!r}"
        ) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.merge", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="base model folder or hub name")
    p.add_argument("--adapter", required=True, type=Path, help="adapter .safetensors file")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    p.add_argument("--c", type=_coefficient, default=1.0, help="coefficient, or 'deployed'")
    p.add_argument("--format", choices=("merged", "peft"), default="merged")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--model-class",
        choices=("causal-lm", "base"),
        default="causal-lm",
        help="peft format: AutoModelForCausalLM or AutoModel to load the base",
    )
    return p


def _local_dir(model: str) -> Path:
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))


def main(argv: list[str] | None = None) -> int:
    """Run the export; returns the process exit code."""
    args = _parser().parse_args(argv)
    if not args.adapter.is_file():
        print(f"error: no adapter file at {args.adapter}", file=sys.stderr)
        return 2
    if args.format == "merged":
        report = ml.merge_checkpoint(
            _local_dir(args.model), args.adapter, args.out, c=args.c, overwrite=args.overwrite
        )
        print(f"merged {report.applied}/{report.attempted} {report.kind} targets at c={report.c} ")
        print(f"worst relative error {report.worst_rel_error:.2e} -> {args.out}")
        return 0
    import transformers as tf

    cls = tf.AutoModelForCausalLM if args.model_class == "causal-lm" else tf.AutoModel
    model = cls.from_pretrained(args.model).eval()
    adapter = load_adapter(model, args.adapter, attach=False)
    ml.export_peft(adapter, args.out, c=args.c, overwrite=args.overwrite)
    c = adapter.deployed_c if args.c is None else args.c
    print(f"exported {len(adapter.layout)} {adapter.kind} targets at c={c} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
