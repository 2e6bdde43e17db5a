"""``memefx icl describe|prompts|run|parse|table|metagrad``, built from the typed functions they call.

Each subcommand is one function below (or the library function it wraps); jsonargparse turns its
signature, with the dataclasses it takes (``EngineConfig``), into flags, ``--config`` YAML and ``--help``
(from the docstrings), as LightningCLI does for ``memefx fit``: an option is written once, where it is used.
``memefx icl run --config configs/icl/llama2_13b_chat_nf4.yaml --engine.batch_size 4`` mixes both.

Flags use the parameter names (``--max_groups``, ``--engine.max_new_tokens``); ``--max-groups`` is accepted
too, a bare boolean flag means true, and a list option takes ``0,2`` as well as ``[0, 2]``. User errors
(a missing file, a model folder that is not there, a malformed table) exit 2 with a one-line message.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pandas as pd

from memefx.icl.engine import EngineConfig, UserError
from memefx.typed_cli import dash_to_underscore


def _read(path: str) -> pd.DataFrame:
    from memefx.table_io import read_table

    return read_table(path, text_columns=("id", "image_id"))


def _write(table: pd.DataFrame, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False) if out.endswith(".csv") else table.to_parquet(out, index=False)


# --------------------------------------------------------------------------------------------------- describe
def describe(root: str, model: str, cache: str, out: str, splits: list[str] = ["train", "dev_seen", "test_seen"],  # noqa: B006
             batch_size: int = 8, max_new_tokens: int = 40) -> str:
    """BLIP-2 descriptions of an HMC folder's images, written in the caption-table schema.

    Args:
        root: HMC-layout folder (jsonl files and img/)
        model: local folder of a Blip2ForConditionalGeneration
        cache: folder of cached descriptions (keyed by image content)
        out: caption table to write (hm_captions.parquet)
        splits: splits whose images are described
        batch_size: images per generate call
        max_new_tokens: description length cap
    """
    from memefx.data.hmc import read_hmc
    from memefx.icl.captions import describe as describe_images

    frames = read_hmc(root, splits)
    memes = pd.concat(frames.values()).drop_duplicates("id")
    table = describe_images(memes, root, model, cache, batch_size, max_new_tokens)
    _write(table, out)
    return f"memefx icl describe: {len(table)} images -> {out}"


# ---------------------------------------------------------------------------------------------------- prompts
def prompts(out: str, **options) -> str:
    """Prompt tables: memefx's layout, the published procedure, or the published prompts replayed.

    The options are the parameters of ``memefx.icl.prompts.build_prompts`` (the subcommand's schema); the
    table is written to ``out`` (.parquet)."""
    from memefx.icl.prompts import build_prompts

    table = build_prompts(**options)
    _write(table, out)
    message = f"memefx icl prompts: {len(table)} prompts for {table.group.nunique()} groups -> {out}"
    dropped = table.attrs.get("dropped")  # published procedure: prompts over the character cap, per shot count
    if dropped is not None:
        message += f"; {sum(dropped.values())} prompts over the character cap dropped (per shot count: {dropped})"
    if "requested_shots" in table:  # memefx layout under a token budget
        trimmed = int((table.requested_shots != table.few_shot_num).sum())
        if trimmed or table.attrs.get("not_repeated"):
            message += (f"; {trimmed} prompts hold fewer demonstrations than asked to fit the budget, "
                        f"{table.attrs.get('not_repeated', 0)} left out as repeats of a smaller shot count")
    if "member_ids" in table and "few_shot_num" in table:
        empty = [f"group {g}, {k}-shot" for g, k, ids in zip(table.group, table.few_shot_num, table.member_ids)
                 if len(ids) == 0]
        if empty:  # a published-layout target whose member lines are all listed under other groups
            message += (f"; {len(empty)} prompts have no pair of their own ({'; '.join(empty[:5])}"
                        f"{'; ...' if len(empty) > 5 else ''}): icl parse and icl table report and skip them")
    if "unmapped" in table:
        unmapped = sum(len(u) for u in table.unmapped if u is not None)
        message += f"; {int(table.rebuilt.sum())} rebuilt byte for byte, {unmapped} pairs not mapped to a meme"
    return message


def _prompt_options():
    from memefx.icl.prompts import build_prompts

    return build_prompts


# -------------------------------------------------------------------------------------------------------- run
def run(prompts: str, cache: str, out: str, engine: EngineConfig, mode: Literal["generate", "score"] = "generate",
        continuations: list[str] = [" benign", " hateful"]) -> str:  # noqa: B006
    """Generate (or score) every prompt; resumable, and sharded by rank under torchrun.

    The output carries every column of the prompt table. In score mode it adds ``logprob_<continuation>``
    and ``p_hateful``: on per-meme prompts (``id, label``) that is a predictions table for ``memefx miate``.

    Args:
        prompts: prompt table with a 'prompt' column (from memefx icl prompts)
        cache: folder of per-rank result shards (rerun the same command to resume)
        out: merged table to write (.parquet)
        engine: model and decoding settings
        mode: free-form answers, or log-probabilities of the continuations
        continuations: label continuations scored in score mode (' benign' then ' hateful')
    """
    import torch

    from memefx.icl.engine import run as run_engine

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    table = _read(prompts)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        merged = run_engine(table, engine, cache, mode, tuple(continuations), rank=rank, world_size=world)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if merged is None:
        return ""
    if "id" in merged:
        merged["id"] = merged["id"].astype(str)
    _write(merged, out)
    message = f"memefx icl run: {len(merged)} rows -> {out}"
    if mode == "score":  # what was scored, exactly: each continuation right after the prompt's last character
        message += "; scored after each prompt: " + ", ".join(repr(c) for c in continuations)
    if mode == "score" and "p_hateful" in merged and "label" in merged:
        labeled = merged[merged.label.isin([0, 1])]
        if labeled.label.nunique() == 2:
            from sklearn.metrics import roc_auc_score

            message += f"; AUROC(p_hateful) = {roc_auc_score(labeled.label, labeled.p_hateful):.4f} on {len(labeled)} rows"
    return message


# ------------------------------------------------------------------------------------------------ parse, table
def _pairs(answers: pd.DataFrame, column: str | None) -> tuple[pd.DataFrame, bool]:
    """Per-pair rows: a run's per-prompt output is expanded first (True when it was)."""
    import warnings

    from memefx.icl.answers import expand_answers, is_run_output

    if answers.empty:
        raise UserError("answers table has no rows")
    if is_run_output(answers):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # prompts without pairs: the command reports them in its output
            return expand_answers(answers, column or "generated_text"), True
    return answers, False


def parse(answers: str, out: str, column: str | None = None) -> str:
    """Free-form answers -> parsed_is_* verdicts per pair; accepts a run's output directly.

    Args:
        answers: a run's output (one row per prompt) or a per-pair answers table (published layout)
        out: parsed table to write (.csv or .parquet)
        column: answer text column (default extracted_info when present, else generated_text)
    """
    from memefx.icl.parse import parse_table

    table, expanded = _pairs(_read(answers), column)
    no_pairs = table.attrs.get("no_pairs", [])
    parsed = parse_table(table, (column or "generated_text") if expanded else column)
    _write(parsed, out)
    hand = [c for c in ("is_functional", "is_formatted", "is_hateful") if c in parsed]
    agreement = {c: round(float((parsed[c] == parsed[f"parsed_{c}"]).mean()), 4) for c in hand}
    report = {"rows": len(parsed), "parsed_functional": int(parsed.parsed_is_functional.sum()),
              "agreement_with_hand_labels": agreement}
    if no_pairs:  # prompts whose target has no pair give no row: counted and named, never dropped silently
        report["prompts_without_pairs"] = no_pairs
    return json.dumps(report)


def table(answers: str, parsed: bool = False, json: bool = False) -> str:  # noqa: A002 - the flag's name
    """Accuracy and ATE of is_hateful (and hateful-or-sarcastic) per shot count.

    Args:
        answers: parsed answers (memefx icl parse), a per-pair answers table, or a run's output
        parsed: score the parsed_is_* columns, parsing first if absent (implied for a run's output)
        json: print JSON instead of a short table
    """
    import json as json_lib

    from memefx.icl.answers import no_pairs_message
    from memefx.icl.metrics import shot_table
    from memefx.icl.parse import parse_table

    rows, expanded = _pairs(_read(answers), None)
    no_pairs = rows.attrs.get("no_pairs", [])
    parsed = parsed or expanded
    if parsed and "parsed_is_functional" not in rows:
        rows = parse_table(rows, "generated_text" if expanded else None)
    result = shot_table(rows, parsed=parsed)
    if json:
        if no_pairs:  # stdout stays one JSON document
            print(f"memefx icl table: {no_pairs_message(no_pairs)}", file=sys.stderr)
        return json_lib.dumps(result, indent=2)
    lines = []
    for shot, r in result.items():
        h = r["is_hateful"]["all"]
        lines.append(f"{shot:>16}  n={r['n']:4d}  acc(is_hateful)={h['accuracy']:.3f}  ATE={h['ate']:.3f}")
    if no_pairs:
        lines.append(f"not counted: {no_pairs_message(no_pairs)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- metagrad
def metagrad(**options) -> str:
    """Meta-gradient features and their analysis; the options are ``run_metagrad``'s parameters."""
    from memefx.icl.engine import resolve_model
    from memefx.icl.metagrad_report import run_metagrad

    options["model"] = str(resolve_model(options["model"]))  # a clear error for a missing folder, never a download
    run_metagrad(**options)  # prints its own summary line
    return ""


# ------------------------------------------------------------------------------------------------- the parser
def commands() -> dict[str, Callable[..., str]]:
    """Subcommand name -> the function it runs."""
    return {"describe": describe, "prompts": prompts, "run": run, "parse": parse, "table": table,
            "metagrad": metagrad}


def schema(name: str) -> list[Callable]:
    """The typed functions whose signatures make up a subcommand's options: its own, or (``prompts``) the
    library function it wraps plus the ``out`` of the wrapper."""
    if name == "prompts":
        return [_out_only, _prompt_options()]
    if name == "metagrad":
        from memefx.icl.metagrad_report import run_metagrad

        return [run_metagrad]
    return [commands()[name]]


def _out_only(out: str) -> None:
    """Args:
    out: table to write (.parquet, or .csv)
    """


def _option_types(func: Callable, prefix: str = "") -> dict[str, object]:
    """Flag name -> type hint of every parameter, dataclass fields flattened as ``name.field``."""
    hints = typing.get_type_hints(func)
    out = {}
    for name in [p for p in hints if p != "return"]:
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            out.update(_option_types(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


_LISTS = (list, tuple, collections.abc.Sequence)


def _normalize(argv: list[str], types: dict[str, object]) -> list[str]:
    """Accept the spellings users type: ``--a-b`` for ``--a_b``, a bare boolean flag, ``0,2`` for a list."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        name, eq, value = dash_to_underscore(token)[2:].partition("=")  # the one dash rule of every command
        hint = types.get(name)
        args = set(typing.get_args(hint)) | {hint}
        if not eq and i < len(argv) and not argv[i].startswith("--"):
            value, eq = argv[i], "="
            i += 1
        if bool in args and not eq:
            value, eq = "true", "="
        if eq and value and not value.startswith("[") and any(typing.get_origin(a) in _LISTS for a in args):
            items = value.split(",")
            value = json.dumps([int(v) if v.strip().lstrip("-").isdigit() else v for v in items])
        out.append(f"--{name}{eq}{value}" if eq else f"--{name}")
    return out


def build_parser(names: list[str] | None = None):
    """The jsonargparse parser of the named subcommands (default: all), with a ``--config`` YAML each."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="memefx icl", description="In-context evaluation with an LLM (no Trainer).")
    sub = parser.add_subcommands(dest="command", required=True)
    for name in commands():
        if names is not None and name not in names:
            continue
        doc = (schema(name)[-1].__doc__ or "").split("\n")[0]
        p = ArgumentParser(prog=f"memefx icl {name}", description=doc)
        p.add_argument("--config", action=ActionConfigFile, help="YAML of these options; later flags override it")
        for source in schema(name):
            p.add_function_arguments(source, fail_untyped=True)
        sub.add_subcommand(name, p, help=doc)
    return parser


def main(argv: list[str]) -> int:
    """Run one ``memefx icl`` subcommand; user errors print one line and return 2."""
    name = argv[0] if argv else ""
    types = {k: v for source in schema(name) for k, v in _option_types(source).items()} if name in commands() else {}
    parser = build_parser([name] if name in commands() else None)
    config = parser.parse_args([name, *_normalize(argv[1:], types)] if name in commands() else argv)
    func = commands()[name]
    try:
        init = parser.instantiate(config)[name]  # a dataclass refusing its values (EngineConfig) is a user error
        kwargs = {k: init[k] for source in schema(name) for k in inspect.signature(source).parameters}
        message = func(**kwargs)
    except KeyboardInterrupt:
        cache = getattr(config.get(name), "cache", None) if hasattr(config, "get") else None
        where = f" in {cache}" if cache else ""
        print(f"memefx icl {name}: interrupted; the answers written so far are kept{where}: rerun the same "
              "command to go on from there", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError) as err:
        text = str(err).replace("\n", " ") or type(err).__name__
        print(f"memefx icl {name}: {text}", file=sys.stderr)
        return 2
    if message:
        print(message)
    return 0
