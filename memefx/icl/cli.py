"""``memefx icl describe|prompts|run|parse|table``: descriptions, prompts, the LLM engine, parsing, tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def _read(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"memefx icl: {p} not found")
    return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)


def _run(a) -> int:
    import os

    import torch

    from memefx.icl.engine import EngineConfig, run

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    cfg = EngineConfig(model=a.model, dtype=a.dtype, quantize=a.quantize, batch_size=a.batch_size,
                       max_new_tokens=a.max_new_tokens, do_sample=a.sample, seed=a.seed)
    try:
        merged = run(_read(a.prompts), cfg, a.cache, a.mode, rank=rank, world_size=world)
        if merged is not None:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            merged.to_parquet(a.out, index=False)
            print(f"memefx icl run: {len(merged)} rows -> {a.out}")
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _prompts(a) -> int:
    from memefx.data.strata import strata_members
    from memefx.data.tables import read_captions, read_confounders
    from memefx.icl.prompts import build_prompt_table

    members = strata_members(read_confounders(a.confounders))
    members = members[(members.split == a.split) & (members.kind == a.kind)]
    if members.empty:
        raise SystemExit(f"memefx icl prompts: no {a.kind} strata in split {a.split!r}")
    captions = read_captions(a.captions)
    texts = dict(zip(captions.image_id, captions[a.text_column]))
    descriptions = dict(zip(captions.image_id, captions[a.description_column]))
    missing = sorted(set(members.id) - set(texts))
    if missing:
        raise SystemExit(f"memefx icl prompts: {len(missing)} stratum members have no caption row: {missing[:10]}")
    if a.per_meme:
        from memefx.icl.prompts import meme_prompt

        rows = members.drop_duplicates("id")
        table = pd.DataFrame({"id": rows.id.values, "group": rows.anchor.values, "label": rows.label.values,
                              "prompt": [meme_prompt(texts[i], descriptions[i])[0] for i in rows.id]})
    else:
        cost = None
        if a.budget is not None:
            if not a.tokenizer:
                raise SystemExit("memefx icl prompts: --budget needs --tokenizer")
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(a.tokenizer, local_files_only=True)

            def cost(prompt: str) -> int:
                return len(tok(prompt)["input_ids"])

        table = build_prompt_table(members, texts, descriptions, [int(k) for k in a.shots.split(",")], a.seed,
                                   a.budget, cost)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(a.out, index=False)
    print(f"memefx icl prompts: {len(table)} prompts for {table.group.nunique()} strata -> {a.out}")
    return 0


def _importance_plot(result: dict, path: Path) -> Path | None:
    """Bar chart of the top feature groups (kind | zero-shot, delta or dual | layer) per outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, r["importance"]) for name, r in result["outcomes"].items() if "importance" in r]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, importance) in zip(axes[0], panels):
        top = list(importance.items())[:10][::-1]
        ax.barh([k for k, _ in top], [v for _, v in top])
        ax.set(title=f"{name}: |standardized coefficient|", xlabel="sum over heads")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metagrad(a) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memefx.icl.metagrad_analysis import analyse
    from memefx.icl.metagrad_features import features_table

    answers = _read(a.answers)
    if a.max_groups:
        answers = answers[answers.image_id.isin(answers.image_id.drop_duplicates().head(a.max_groups))]
    model = AutoModelForCausalLM.from_pretrained(a.model, local_files_only=True, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    features = features_table(answers, model, tok, layers)
    features.to_parquet(out / "features.parquet", index=False)
    result = analyse(features, answers)
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    lines = [f"# meta-gradient analysis ({result['rows']} answer rows, {result['groups']} groups, "
             f"{result['features']} features)", "",
             "| outcome | positive | grouped AUC [95% CI] | row split (leaky) AUC | top features |", "|---|---:|---|---|---|"]
    for name, r in result["outcomes"].items():
        if "grouped" not in r:
            lines.append(f"| {name} | {r['positive']} | {r.get('note', '')} | | |")
            continue
        g, leak = r["grouped"], r["row_split_leaky"]
        top = ", ".join(list(r["importance"])[:3])
        lines.append(f"| {name} | {r['positive']} | {g['auc']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}] | "
                     f"{leak['auc']:.3f} | {top} |")
    plot = _importance_plot(result, out / "importance.png")
    if plot:
        lines += ["", f"![importance]({plot.name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"memefx icl metagrad: {len(features)} prompts, {result['features']} features -> {out}")
    return 0


def main(argv: list[str]) -> int:
    from memefx.icl.metrics import shot_table
    from memefx.icl.parse import parse_table

    p = argparse.ArgumentParser(prog="memefx icl")
    sub = p.add_subparsers(dest="command", required=True)
    parse = sub.add_parser("parse", help="free-form answers -> parsed_is_* verdict columns")
    parse.add_argument("--answers", required=True)
    parse.add_argument("--out", required=True, help=".csv or .parquet")
    parse.add_argument("--column", default=None, help="answer text column (default extracted_info)")
    table = sub.add_parser("table", help="accuracy and ATE per shot count")
    table.add_argument("--answers", required=True)
    table.add_argument("--parsed", action="store_true", help="score the parsed_is_* columns (parsing first if absent)")
    table.add_argument("--json", action="store_true")
    run = sub.add_parser("run", help="generate or score every prompt (resumable; torchrun shards by rank)")
    run.add_argument("--config", default=None, help="YAML of these options (configs/icl/*.yaml); flags override")
    run.add_argument("--prompts", required=True, help="table with a 'prompt' column")
    run.add_argument("--model", default=None, help="local folder of a causal LM (or a cached hub id)")
    run.add_argument("--mode", choices=["generate", "score"], default="generate")
    run.add_argument("--cache", required=True, help="folder of per-rank result shards")
    run.add_argument("--out", required=True, help="merged table (.parquet)")
    run.add_argument("--quantize", choices=["nf4", "int8"], default=None)
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy decoding")
    run.add_argument("--seed", type=int, default=0)
    prompts = sub.add_parser("prompts", help="pair-selection prompts for every stratum of a split, k = 0..4 shots")
    prompts.add_argument("--confounders", required=True)
    prompts.add_argument("--captions", required=True)
    prompts.add_argument("--split", default="dev_seen")
    prompts.add_argument("--kind", choices=["shared_image", "shared_text"], default="shared_image")
    prompts.add_argument("--shots", default="0,1,2,3,4")
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--text-column", default="text", help="caption-table column standing in for the meme text")
    prompts.add_argument("--description-column", default="text_captioned")
    prompts.add_argument("--budget", type=int, default=None, help="token budget per prompt (needs --tokenizer)")
    prompts.add_argument("--tokenizer", default=None, help="local tokenizer folder measuring the budget")
    prompts.add_argument("--per-meme", action="store_true", help="one per-meme prompt per stratum member instead")
    prompts.add_argument("--out", required=True)
    desc = sub.add_parser("describe", help="BLIP-2 descriptions of an HMC folder's images (caption-table schema)")
    desc.add_argument("--root", required=True, help="HMC-layout folder")
    desc.add_argument("--splits", default="train,dev_seen,test_seen")
    desc.add_argument("--model", required=True, help="local folder of a Blip2ForConditionalGeneration")
    desc.add_argument("--cache", required=True)
    desc.add_argument("--out", required=True, help="hm_captions.parquet")
    desc.add_argument("--batch-size", type=int, default=8)
    desc.add_argument("--max-new-tokens", type=int, default=40)
    meta = sub.add_parser("metagrad", help="per-layer attention-mass and dual-form features, and their analysis")
    meta.add_argument("--answers", required=True, help="answers table with prompt, image_id, few_shot_num and labels")
    meta.add_argument("--model", required=True, help="local folder of the causal LM that answered")
    meta.add_argument("--out", required=True, help="folder for features.parquet, analysis.json, report.md")
    meta.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    meta.add_argument("--max-groups", type=int, default=None, help="first N target groups only")
    a = p.parse_args(argv)
    if a.command == "metagrad":
        return _metagrad(a)
    if a.command == "describe":
        from memefx.data.hmc import read_hmc
        from memefx.icl.captions import describe

        frames = read_hmc(a.root, a.splits.split(","))
        memes = pd.concat(frames.values()).drop_duplicates("id")
        table = describe(memes, a.root, a.model, a.cache, a.batch_size, a.max_new_tokens)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(a.out, index=False)
        print(f"memefx icl describe: {len(table)} images -> {a.out}")
        return 0
    if a.command == "prompts":
        return _prompts(a)
    if a.command == "run":
        if a.config:
            import yaml

            values = yaml.safe_load(Path(a.config).read_text()) or {}
            unknown = sorted(set(values) - set(vars(a)))
            if unknown:
                raise SystemExit(f"memefx icl run: {a.config}: unknown options {unknown}")
            run.set_defaults(**values)
            a = p.parse_args(argv)
        if not a.model:
            raise SystemExit("memefx icl run: --model (or model: in --config) is required")
        return _run(a)
    answers = _read(a.answers)
    if a.command == "parse":
        out = parse_table(answers, a.column)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        out.to_parquet(a.out, index=False) if a.out.endswith(".parquet") else out.to_csv(a.out, index=False)
        hand = [c for c in ("is_functional", "is_formatted", "is_hateful") if c in answers]
        agreement = {c: round(float((out[c] == out[f"parsed_{c}"]).mean()), 4) for c in hand}
        print(json.dumps({"rows": len(out), "parsed_functional": int(out.parsed_is_functional.sum()),
                          "agreement_with_hand_labels": agreement}))
        return 0
    if a.parsed and "parsed_is_functional" not in answers:
        answers = parse_table(answers)
    result = shot_table(answers, parsed=a.parsed)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for shot, r in result.items():
            h = r["is_hateful"]["all"]
            print(f"{shot:>16}  n={r['n']:4d}  acc(is_hateful)={h['accuracy']:.3f}  ATE={h['ate']:.3f}")
    return 0
