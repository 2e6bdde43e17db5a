"""The ``memefx`` command: LightningCLI subcommands (fit/validate/test/predict) plus data tools.

``main(argv)`` is importable so tests run every command in-process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from memefx.errors import UserError
from memefx.run_files import METRICS, PROVENANCE
from memefx.typed_cli import dash_to_underscore, parser_for, run_typed, split_own

TOOLS = ("synth", "strata", "report", "regions", "icl", "miate", "study")
OVERVIEW = """usage: memefx <command> [options]       (memefx <command> --help: the options of one command)

train and evaluate (LightningCLI; the run directory is --trainer.default_root_dir):
  fit        train, validate every epoch (AUROC, miATE, MIDAS), optionally test the best checkpoint
  validate   evaluate a checkpoint on the validation split
  test       evaluate a checkpoint on the test splits
  predict    write p_hateful for the predict splits
data and analysis:
  synth      write a synthetic Hateful-Memes-layout dataset with a known data-generating process
  strata     confounder strata per split and kind
  regions    convert a region-feature TSV into <id>.npz files
  miate      miATE of any predictions file on the confounder strata
  study      one fit per training seed, and a summary over seeds
  report     plots and tables of a run directory or a study; --compare RUN_A RUN_B
in-context learning with an LLM (no Trainer):
  icl        describe | prompts | run | parse | table | metagrad
add --debug to any command for the Python traceback of an error"""


def _synth(argv: list[str]) -> int:
    """``memefx synth``: the options are ``SyntheticConfig``'s fields (one schema for flags and YAML)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from memefx.data.strata import summarize
    from memefx.data.synthetic import SyntheticConfig, write_synthetic
    from memefx.data.tables import read_confounders

    p = ArgumentParser(prog="memefx synth", description="Write a synthetic HMC-layout dataset.", exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    p.add_argument("--out", required=True, help="folder to write (HMC layout plus side tables); must be empty or new")
    p.add_argument("--overwrite", type=bool, default=False,
                   help="replace an earlier synthetic dataset in --out (its files are deleted first)")
    p.add_class_arguments(SyntheticConfig, None, as_group=False)
    a = p.parse_args([dash_to_underscore(x) for x in argv])
    cfg = SyntheticConfig(**{f.name: a[f.name] for f in dataclasses.fields(SyntheticConfig)})
    out = write_synthetic(a.out, cfg, overwrite=a.overwrite)
    conf = read_confounders(out / "confounders.parquet")
    counts = conf.groupby("split").label.agg(["size", "sum"]).rename(columns={"size": "memes", "sum": "hateful"})
    print(json.dumps({"out": str(out), "splits": counts.astype(int).to_dict("index"), "strata": summarize(conf)}, indent=2))
    return 0


_dash_to_underscore = dash_to_underscore  # older imports


def strata(confounders: str, split: str | None = None, json: bool = False) -> int:
    """Confounder strata per split and kind: member rows, groups, strata (both labels), pairs, sizes.

    Args:
        confounders: confounder table (id, split, label, img_org_id, txt_org_id)
        split: one split only (default: every split)
        json: print JSON (default: a readable table)
    """
    import json as json_module

    from memefx.data.strata import summarize
    from memefx.data.tables import read_confounders

    summary = summarize(read_confounders(confounders), split)
    if split is not None and not summary:
        raise UserError(f"memefx strata: no confounder groups in split {split!r} of {confounders}")
    if json:
        print(json_module.dumps(summary, indent=2))
        return 0
    print(f"{'split':<12} {'kind':<13} {'rows':>6} {'groups':>7} {'strata':>7} {'pairs':>6}  sizes")
    for name, kinds in summary.items():
        for kind, s in kinds.items():
            print(f"{name:<12} {kind:<13} {s['member_rows']:>6} {s['groups']:>7} {s['strata']:>7} "
                  f"{s['two_member_strata']:>6}  {s['size_histogram']}")
    return 0


def report(run_dir: str | None = None, compare: list[str] | None = None, atol: float = 1e-6,
           rtol: float = 1e-5) -> int:
    """Plots and a markdown table of a run directory or a study; with --compare, what differs between two
    runs (exit 1 when results differ).

    Args:
        run_dir: a run directory (--trainer.default_root_dir) or a study folder (memefx study --out)
        compare: two run directories, RUN_A RUN_B
        atol: absolute tolerance on metrics, probabilities and sums
        rtol: relative tolerance: |a - b| <= atol + rtol * scale (a number's own magnitude; a MIDAS table's
            largest |sum| per score)
    """
    if compare:
        from memefx.report.compare import compare_runs

        missing = [r for r in compare if not Path(r).is_dir()]
        if missing:
            raise UserError(f"memefx report --compare: not a run directory: {missing}")
        info, results = compare_runs(*compare, atol=atol, rtol=rtol)
        for line in info:
            print(f"  differs (info): {line}")
        for line in results:
            print(f"  DIFFERS: {line}")
        print(f"{len(results)} result differences beyond atol={atol}, rtol={rtol}; {len(info)} config/provenance "
              "differences")
        return 1 if results else 0
    if run_dir is None or not Path(run_dir).is_dir():
        raise UserError(f"memefx report: {run_dir} is not a run directory")
    from memefx.report.run import write_report

    print(write_report(run_dir))
    return 0


def regions(tsv: str, out: str) -> int:
    """Convert a bottom-up-attention TSV of region features into the <id>.npz files data.region_features reads.

    Args:
        tsv: the TSV (img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes,
            features)
        out: folder for the <id>.npz files
    """
    from memefx.data.regions import convert_tsv

    print(f"wrote {convert_tsv(tsv, out)} region files to {out}")
    return 0


def study(out: str, seeds: str | None = None, summarize_only: bool = False, no_summary: bool = False,
          n_bootstrap: int = 2000, fit_args: Sequence[str] = ()) -> int:
    """Fit one run per seed (OUT/seed<k>: the same config and data; the seed sets seed_everything, model.seed
    and data.shuffle_seed) and summarize them: per split AUROC/accuracy mean and sd over seeds, miATE per kind
    and the image-minus-text difference with hierarchical-bootstrap intervals (OUT/study.json, OUT/study.csv).
    Every other option goes to memefx fit (--config ... included).

    Args:
        out: study folder; runs go to OUT/seed<k>
        seeds: comma-separated seeds, e.g. 0,1,2 (not with --summarize-only)
        summarize_only: no fit: summarize the finished OUT/seed<k> runs
        no_summary: fit only (one task of a SLURM job array)
        n_bootstrap: resamples of the hierarchical bootstrap
        fit_args: the memefx fit options of every seed's run
    """
    from memefx.report.study import study_lines, summarize_study

    folder = Path(out)
    fit_args = list(fit_args)
    if summarize_only and (seeds or fit_args):
        raise UserError(f"memefx study --summarize-only fits nothing: drop {(['--seeds'] if seeds else []) + fit_args}")
    if not summarize_only:
        try:
            chosen = [int(x) for x in (seeds or "").split(",") if x.strip()]
        except ValueError:
            raise UserError(f"memefx study --seeds {seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        if not chosen or len(set(chosen)) != len(chosen):
            raise UserError(f"memefx study --seeds {seeds!r}: give one or more distinct seeds, e.g. 0,1,2")
        if "--config" not in fit_args:
            raise UserError("memefx study needs --config CONFIG (the experiment each seed fits)")
        for seed in chosen:
            run = folder / f"seed{seed}"
            if (run / METRICS).is_file() and (run / PROVENANCE).is_file():
                print(f"memefx study: {run} holds a finished run; kept (delete it to refit)", flush=True)
                continue
            print(f"memefx study: seed {seed} -> {run}", flush=True)
            code = _dispatch(["fit", *fit_args, "--seed_everything", str(seed), "--model.seed", str(seed),
                              "--data.shuffle_seed", str(seed), "--trainer.default_root_dir", str(run)])
            if code:
                return code
    if no_summary:
        return 0
    if n_bootstrap < 1:
        raise UserError(f"memefx study --n-bootstrap {n_bootstrap}: expected a positive number of resamples")
    summarize_study(folder, n_bootstrap=n_bootstrap)
    print("\n".join(study_lines(json.loads((folder / "study.json").read_text()))))
    print(f"memefx study: wrote {folder / 'study.json'} and {folder / 'study.csv'}")
    return 0


def _study(argv: list[str]) -> int:
    """``memefx study``: its own options parsed from ``study``'s signature, every other one handed to fit."""
    own, fit_args = split_own(study, argv)
    config = parser_for(study, "memefx study", skip=("fit_args",)).parse_args(own)
    return study(**{k: config[k] for k in ("out", "seeds", "summarize_only", "no_summary", "n_bootstrap")},
                 fit_args=fit_args)


USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError, KeyError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``memefx`` console script.

    Errors in the input print one line naming the file, id or value and exit with status 2; ``--debug``
    (or ``MEMEFX_DEBUG=1``) shows the traceback instead.
    """
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MEMEFX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv, from_shell and "--debug" not in sys.argv)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into messages
        if debug:
            raise
        where = traceback.extract_tb(err.__traceback__)[-1]
        hint = "" if isinstance(err, UserError) else f" [{type(err).__name__} at {Path(where.filename).name}:{where.lineno}]"
        print(f"memefx: error: {err}{hint}\n(rerun with --debug for the traceback)", file=sys.stderr)
        return 2 if isinstance(err, USER_ERRORS) else 1


def check_config_files(argv: list[str]) -> None:
    """Every ``--config FILE`` must exist and parse as YAML: the parsers' own error names no file and comes
    after a page of usage text."""
    import yaml

    for k, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[k + 1] if arg == "--config" and k + 1 < len(argv) else None
        if value is None or value.lstrip().startswith(("{", "[")):
            continue  # an inline YAML/JSON value: the parser reports it
        path = Path(value)
        if not path.is_file():
            raise UserError(f"--config {value}: no such file")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UserError(f"{where}: not valid YAML ({problem}); check the indentation there") from None


def _dispatch(argv: list[str], from_shell: bool = False) -> int:
    check_config_files(argv)
    if argv and argv[0] == "icl":
        from memefx.icl.cli import main as icl_main

        return icl_main(argv[1:])
    if argv and argv[0] == "miate":
        from memefx.report.miate_cli import main as miate_main

        return miate_main(argv[1:])
    if argv and argv[0] == "study":
        return _study(argv[1:])
    if argv and argv[0] == "synth":
        return _synth(argv[1:])
    if argv and argv[0] in TOOLS:
        func = {"strata": strata, "report": report, "regions": regions}[argv[0]]
        return run_typed(func, argv[1:], f"memefx {argv[0]}", positional=("run_dir",) if func is report else (),
                         several={"compare": 2} if func is report else None)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return 0 if argv else 2
    from memefx.lightning_cli import run_lightning_cli

    run_lightning_cli(None if from_shell else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
