"""The ``memefx`` command: LightningCLI subcommands (fit/validate/test/predict) plus data tools.

``main(argv)`` is importable so tests run every command in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

from memefx.errors import UserError

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
    a = p.parse_args([_dash_to_underscore(x) for x in argv])
    cfg = SyntheticConfig(**{f.name: a[f.name] for f in dataclasses.fields(SyntheticConfig)})
    out = write_synthetic(a.out, cfg, overwrite=a.overwrite)
    conf = read_confounders(out / "confounders.parquet")
    counts = conf.groupby("split").label.agg(["size", "sum"]).rename(columns={"size": "memes", "sum": "hateful"})
    print(json.dumps({"out": str(out), "splits": counts.astype(int).to_dict("index"), "strata": summarize(conf)}, indent=2))
    return 0


def _dash_to_underscore(arg: str) -> str:
    """``--n-memes`` and ``--n_memes`` alike (field names have underscores; shells like dashes)."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def _strata(argv: list[str]) -> int:
    from memefx.data.strata import summarize
    from memefx.data.tables import read_confounders

    p = argparse.ArgumentParser(prog="memefx strata", description="Confounder strata per split and kind.")
    p.add_argument("--confounders", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--json", action="store_true", help="print JSON (default: a readable table)")
    a = p.parse_args(argv)
    summary = summarize(read_confounders(a.confounders), a.split)
    if a.split is not None and not summary:
        print(f"memefx strata: no confounder groups in split {a.split!r}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'split':<12} {'kind':<13} {'rows':>6} {'groups':>7} {'strata':>7} {'pairs':>6}  sizes")
    for split, kinds in summary.items():
        for kind, s in kinds.items():
            print(f"{split:<12} {kind:<13} {s['member_rows']:>6} {s['groups']:>7} {s['strata']:>7} "
                  f"{s['two_member_strata']:>6}  {s['size_histogram']}")
    return 0


def _report(argv: list[str]) -> int:
    from memefx.report.run import write_report

    p = argparse.ArgumentParser(prog="memefx report", description="Plots and a markdown table of a run directory; "
                                "with --compare, what differs between two runs (exit 1 when results differ).")
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"))
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance on metrics, probabilities and sums")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance: |a - b| <= atol + rtol * scale "
                   "(a number's own magnitude; a MIDAS table's largest |sum| per score)")
    a = p.parse_args(argv)
    if a.compare:
        from memefx.report.compare import compare_runs

        missing = [r for r in a.compare if not Path(r).is_dir()]
        if missing:
            print(f"memefx report --compare: not a run directory: {missing}", file=sys.stderr)
            return 2
        info, results = compare_runs(*a.compare, atol=a.atol, rtol=a.rtol)
        for line in info:
            print(f"  differs (info): {line}")
        for line in results:
            print(f"  DIFFERS: {line}")
        print(f"{len(results)} result differences beyond atol={a.atol}, rtol={a.rtol}; {len(info)} config/provenance "
              "differences")
        return 1 if results else 0
    if a.run_dir is None or not Path(a.run_dir).is_dir():
        print(f"memefx report: {a.run_dir} is not a run directory", file=sys.stderr)
        return 2
    print(write_report(a.run_dir))
    return 0


def _regions(argv: list[str]) -> int:
    from memefx.data.regions import convert_tsv

    p = argparse.ArgumentParser(prog="memefx regions", description="Convert a bottom-up-attention TSV of region "
                                "features into the <id>.npz files that data.region_features reads.")
    p.add_argument("--tsv", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    print(f"wrote {convert_tsv(a.tsv, a.out)} region files to {a.out}")
    return 0


def _study(argv: list[str]) -> int:
    """``memefx study``: one ``memefx fit`` per training seed into sibling run folders, then the summary."""
    from memefx.report.study import study_lines, summarize_study

    p = argparse.ArgumentParser(
        prog="memefx study", description="Fit one run per seed (OUT/seed<k>, the same config and data; the seed "
        "sets seed_everything, model.seed and data.shuffle_seed) and summarize them: per split AUROC/accuracy "
        "mean and sd over seeds, miATE per kind and the image-minus-text difference with hierarchical-bootstrap "
        "intervals (OUT/study.json, OUT/study.csv). Other options go to memefx fit.")
    p.add_argument("--out", required=True, help="study folder; runs go to OUT/seed<k>")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (not with --summarize-only)")
    p.add_argument("--summarize-only", action="store_true", help="no fit: summarize the finished OUT/seed<k> runs")
    p.add_argument("--no-summary", action="store_true", help="fit only (one task of a SLURM job array)")
    p.add_argument("--n-bootstrap", type=int, default=2000)
    a, fit_args = p.parse_known_args(argv)
    out = Path(a.out)
    if a.summarize_only and (a.seeds or fit_args):
        raise UserError(f"memefx study --summarize-only fits nothing: drop {(['--seeds'] if a.seeds else []) + fit_args}")
    if not a.summarize_only:
        try:
            seeds = [int(x) for x in (a.seeds or "").split(",") if x.strip()]
        except ValueError:
            raise UserError(f"memefx study --seeds {a.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError(f"memefx study --seeds {a.seeds!r}: give one or more distinct seeds, e.g. 0,1,2")
        if "--config" not in fit_args:
            raise UserError("memefx study needs --config CONFIG (the experiment each seed fits)")
        for seed in seeds:
            run = out / f"seed{seed}"
            if (run / "metrics.json").is_file() and (run / "provenance.json").is_file():
                print(f"memefx study: {run} holds a finished run; kept (delete it to refit)", flush=True)
                continue
            print(f"memefx study: seed {seed} -> {run}", flush=True)
            code = _dispatch(["fit", *fit_args, "--seed_everything", str(seed), "--model.seed", str(seed),
                              "--data.shuffle_seed", str(seed), "--trainer.default_root_dir", str(run)])
            if code:
                return code
    if a.no_summary:
        return 0
    if a.n_bootstrap < 1:
        raise UserError(f"memefx study --n-bootstrap {a.n_bootstrap}: expected a positive number of resamples")
    summarize_study(out, n_bootstrap=a.n_bootstrap)
    print("\n".join(study_lines(json.loads((out / "study.json").read_text()))))
    print(f"memefx study: wrote {out / 'study.json'} and {out / 'study.csv'}")
    return 0


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
    if argv and argv[0] in TOOLS:
        return {"synth": _synth, "strata": _strata, "report": _report, "regions": _regions,
                "study": _study}[argv[0]](argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return 0 if argv else 2
    from memefx.lightning_cli import run_lightning_cli

    run_lightning_cli(None if from_shell else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
