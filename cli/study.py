"""amp study: the paper's claims on label-free digits ViTs, written to STUDY_DIR."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from .common import SetOpt, load, user_errors


@user_errors
def study_cmd(
    out: Path = typer.Argument(Path("runs/study"), help="STUDY_DIR: study.md, study.json, PNGs"),
    seeds: int = typer.Option(3, help="seeds (data draws and deeper teachers)"),
    deep_depth: int = typer.Option(8, help="blocks of the deeper teacher"),
    deep_epochs: int = typer.Option(60, help="SimCLR epochs of the deeper teacher"),
    distill_epochs: int = typer.Option(4, help="distillation epochs per pruned model"),
    cache: Path = typer.Option(Path(".cache/study"), help="where deeper teachers are cached"),
    teachers: str = typer.Option("demo,deep", help="demo and/or deep"),
    experiments: str = typer.Option("criteria,budget,val_size",
                                    help="which experiments run (a subset saves time)"),
    deep_teacher_seed: int = typer.Option(None, help="one deeper teacher (this seed) for "
                                                     "every seed, instead of one per seed"),
    budgets: str = typer.Option("0.2,0.35,0.5,0.65", help="MLP-parameter fractions kept"),
    measures: str = typer.Option("kl,cosine,entropy_rise",
                                 help="search measures allocated globally at each budget"),
    distill_budgets: str = typer.Option("0.2,0.5", help="budgets whose sizings are also "
                                                       "distilled (empty: none)"),
    distill_hows: str = typer.Option("authors,uniform,global_kl",
                                     help="sizings distilled at those budgets"),
    val_sizes: str = typer.Option("64,128,256,512,768", help="validation images tried"),
    max_searches: int = typer.Option(8, help="budget mode: AMP searches at most"),
    tolerance: float = typer.Option(0.02, help="budget mode: relative tolerance"),
    report_only: bool = typer.Option(False, "--report-only",
                                     help="redo study.md and the plots from STUDY_DIR/study.json"),
    set_: list[str] = SetOpt,
) -> None:
    """Criteria; the authors' per-block rule vs uniform sizes vs global allocation at equal
    MLP parameters, before and after distillation; validation-set size; over seeds (a
    benchmark: tens of minutes on 2 CPU cores, see docs/study)."""
    from amp_plugin.bench.study import StudyConfig, rerender, run_study

    console = Console()
    if report_only:
        rerender(out)
        console.print((out / "study.md").read_text())
        return
    cfg = StudyConfig(out=out, recipe=load("demo_digits", set_), seeds=tuple(range(seeds)),
                      deep_depth=deep_depth, deep_epochs=deep_epochs,
                      distill_epochs=distill_epochs, cache=cache,
                      teachers=tuple(t.strip() for t in teachers.split(",")),
                      experiments=_names(experiments),
                      budgets=tuple(float(b) for b in budgets.split(",")),
                      val_sizes=tuple(int(n) for n in val_sizes.split(",")),
                      measures=_names(measures), distill_hows=_names(distill_hows),
                      distill_budgets=tuple(float(b) for b in _names(distill_budgets)),
                      max_searches=max_searches, tolerance=tolerance,
                      deep_teacher_seed=deep_teacher_seed, log=console.log)
    result = run_study(cfg)
    console.print((out / "study.md").read_text())
    console.log(f"study: {out / 'study.json'} ({result['seconds']['total'] / 60:.1f} min)")


def _names(csv: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in csv.split(",") if n.strip())
