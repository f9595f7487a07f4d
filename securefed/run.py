"""Run a federation from a configuration and write the files a run leaves behind.

The top of the stack (beside the CLI): it drives the in-process runtime
(:mod:`securefed.fl.simulation`) and the writers of :mod:`securefed.report.artifacts`.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import tempfile
from pathlib import Path

from securefed.config import RunConfig
from securefed.errors import ConfigError, SecureFedError
from securefed.fl.simulation import Federation
from securefed.report.artifacts import package_versions, write_outputs
from securefed.validate import validate_inputs

__all__ = [
    "train",
    "package_versions",
    "default_out_dir",
    "check_out_dir",
    "resume_config",
    "RunInterrupted",
    "PARTIAL_MARK",
]


def default_out_dir() -> Path:
    """A fresh timestamped folder under ``runs/``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return Path("runs") / stamp


#: A run is written into ``<out>.partial-<random>`` beside ``<out>`` and renamed at the end.
PARTIAL_MARK = ".partial-"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`; the message says what was kept and how to resume.

    A :class:`KeyboardInterrupt`, so code that stops on Ctrl-C keeps stopping.
    """


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` a run must not write into; a missing or empty folder is fine.

    Raises:
        ConfigError: If ``out`` is a file, holds a finished or unfinished run, or holds
            anything else (a user's files are never overwritten).

    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if not out.is_dir():
        return
    if (out / "privacy.json").exists():
        raise ConfigError(f"--out {out}: already holds a run; choose another folder")
    if (out / "checkpoint" / "checkpoint.json").exists():
        raise ConfigError(
            f"--out {out}: holds an unfinished run; continue it with "
            f"`securefed train --resume {out}` or choose another folder"
        )
    if any(out.iterdir()):
        raise ConfigError(
            f"--out {out}: is not empty and is not a securefed run; choose a new or empty folder"
        )


def _make_partial(target: Path) -> Path:
    """A fresh ``<target>.partial-<random>`` folder beside ``target`` (umask permissions)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=target.name + PARTIAL_MARK, dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)  # mkdtemp's 0700 would make run folders unlike mkdir's
    return folder


def _target_of(partial: Path) -> Path | None:
    """The run folder a partial folder is renamed to (from its name), if it is one."""
    name, mark, _ = partial.name.rpartition(PARTIAL_MARK)
    return partial.parent / name if mark and name else None


def _checkpoint_folder(run_dir: Path) -> Path:
    """``run_dir`` if it holds a checkpoint, else its single ``.partial-*`` sibling that does."""
    if (run_dir / "checkpoint" / "checkpoint.json").exists():
        return run_dir
    found = sorted(
        p
        for p in run_dir.parent.glob(run_dir.name + PARTIAL_MARK + "*")
        if (p / "checkpoint" / "checkpoint.json").exists()
    )
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(
            f"--resume {run_dir}: several unfinished runs ({', '.join(p.name for p in found)}); "
            "name one"
        )
    if (run_dir / "privacy.json").exists():
        raise ConfigError(f"--resume {run_dir}: the run already finished")
    raise ConfigError(f"--resume {run_dir}: no checkpoint to resume from")


def resume_config(run_dir: Path) -> RunConfig:
    """The configuration an unfinished run in ``run_dir`` was started with.

    Raises:
        ConfigError: If there is no readable in-process checkpoint there.
        IntegrityError: If the checkpoint's weights are not the ones it names.

    """
    from securefed.fl.checkpoint import load_checkpoint

    folder = _checkpoint_folder(Path(run_dir))
    meta = load_checkpoint(folder).meta
    if meta.get("runtime") != "in-process":
        raise ConfigError(
            f"--resume {folder}: a deployed run's checkpoint; continue it with "
            "`securefed deploy run --resume`"
        )
    return RunConfig.from_recorded(meta["config"])


def _finish(partial: Path, target: Path) -> None:
    """Rename the finished ``partial`` to ``target`` (which must still be free)."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # an empty folder the user made for the run is replaced by it
    if target.exists():
        raise ConfigError(
            f"--out {target}: was taken while the run ran; the finished run is in {partial}"
        )
    partial.rename(target)
    shutil.rmtree(target / "checkpoint", ignore_errors=True)


def train(
    config: RunConfig | None = None,
    *,
    out_dir: Path | None = None,
    progress: bool = True,
    federation: Federation | None = None,
    resume: Path | str | None = None,
) -> Path:
    """Run ``config`` to completion and write config, metrics, privacy report, model, summary.

    The run is written into ``<out>.partial-<random>`` beside ``out`` and renamed to ``out``
    once complete, so a failing run leaves no folder. After every completed round that folder
    holds a checkpoint (``checkpoint/``): a run that fails or is interrupted (Ctrl-C) after
    it keeps the folder, and ``train(resume=folder)`` continues from the last complete round.

    Args:
        config: What to run. With ``resume``: ``None`` (the checkpoint's), or the same
            configuration as the checkpoint's.
        out_dir: Where to write (default: :func:`default_out_dir`; with ``resume``: the folder
            the partial folder is named after).
        progress: Show progress bars on stderr.
        federation: A pre-built federation (tests use this to inject dropouts).
        resume: An unfinished run's folder (``<out>.partial-<random>``, or ``<out>`` when it
            has exactly one such sibling) to continue.

    Returns:
        The run directory.

    Raises:
        ConfigError: If ``out_dir`` cannot take the run, or (resume) the checkpoint belongs
            to another configuration or data set.
        RunInterrupted: On Ctrl-C; the message names the kept folder, if any.

    """
    if resume is not None:
        return _resume(
            config, Path(resume), out_dir=out_dir, progress=progress, federation=federation
        )
    if config is None:
        raise ConfigError("train: a configuration is needed (or resume=RUN_DIR)")
    if federation is None:
        validate_inputs(config)  # before anything slow: errors that name the flag
    target = Path(out_dir) if out_dir else default_out_dir()
    check_out_dir(target)
    fed = federation or Federation(config)  # data loading: nothing is written before it
    check_out_dir(target)  # still free after the loading
    # Folders the run creates above its own (e.g. ``runs/``) go too when it fails at once.
    made = [d for d in target.absolute().parents if not d.exists()]
    partial = _make_partial(target)
    return _run(fed, partial=partial, target=target, done=0, progress=progress, made=made)


def _resume(
    config: RunConfig | None,
    run_dir: Path,
    *,
    out_dir: Path | None,
    progress: bool,
    federation: Federation | None,
) -> Path:
    from securefed.fl.checkpoint import load_checkpoint

    saved = resume_config(run_dir)
    folder = _checkpoint_folder(run_dir)
    if saved.logit_adjust and saved.dp_enabled:
        # Each site released its class prior once and keeps it to itself; the server's
        # checkpoint does not hold it, and a site never releases it twice.
        raise ConfigError(
            f"--resume {folder}: a --logit-adjust DP run cannot be resumed in-process (the "
            "sites' released class priors never leave them, so the checkpoint lacks them); "
            "start it again, or run it deployed, where each site keeps its own"
        )
    if config is not None:
        changed = config.with_unflagged_of(saved).differences(saved)
        if changed:
            hint = ""
            if changed == ["teacher"] and saved.teacher == "global":
                hint = (
                    " (the checkpoint's teacher-student run used --teacher global, the only "
                    "teacher before schema 3.5: pass it)"
                )
            elif "calibration_clip" in changed and config.calibration_clip is None:
                hint = (
                    f" (the checkpoint's run released its calibration at R = "
                    f"{saved.calibration_clip:g}, as runs before schema 3.11 did: pass "
                    f"--calibration-clip {saved.calibration_clip:g})"
                )
            raise ConfigError(
                f"--resume {folder}: options differ from the checkpoint's "
                f"({', '.join(changed)}); resume with the same options or none{hint}"
            )
    target = Path(out_dir) if out_dir else _target_of(folder)
    if target is None:
        raise ConfigError(f"--resume {folder}: not a partial run folder; name the run's --out")
    check_out_dir(target)
    fed = federation or Federation(saved)
    ck = load_checkpoint(folder)
    try:
        done = fed.restore(ck)
    except ConfigError as exc:
        raise ConfigError(f"--resume {folder}: {exc}") from exc
    return _run(fed, partial=folder, target=target, done=done, progress=progress)


def _kept_line(partial: Path, done: int) -> str:
    rounds = "round 1" if done == 1 else f"rounds 1-{done}"
    return f"{rounds} kept in {partial}; continue with `securefed train --resume {partial}`"


def _discard(partial: Path, made: list[Path]) -> None:
    """Remove a partial folder with nothing worth keeping, and the empty folders made for it."""
    shutil.rmtree(partial, ignore_errors=True)
    for d in made:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break  # not empty (another run uses it) or already gone


def _run(
    fed: Federation,
    *,
    partial: Path,
    target: Path,
    done: int,
    progress: bool,
    made: list[Path] | None = None,
) -> Path:
    """Rounds ``done + 1 ..`` with a checkpoint after each, the outputs, the rename."""
    from tqdm.auto import tqdm

    from securefed.fl.checkpoint import save_checkpoint

    config = fed.config
    fed.set_progress(progress)
    warning = fed.memory_warning()
    if warning is not None:
        print(warning, file=sys.stderr)
    if done == 0:
        for line in fed.batch_warnings():
            print(line, file=sys.stderr)
    try:
        bar = tqdm(
            range(done + 1, config.rounds + 1),
            desc="rounds",
            unit="round",
            initial=done,
            total=config.rounds,
            disable=not progress,
            file=sys.stderr,
        )
        for r in bar:
            rec = fed.run_round(r)
            model, opt, meta, extra = fed.checkpoint_state()
            save_checkpoint(
                partial,
                round_index=r,
                model_state=model,
                optimizer_state=opt,
                meta=meta,
                extra=extra,
            )
            done = r
            g = rec.data["global"]
            eps = [c["epsilon"] for c in rec.data["clients"] if c["epsilon"] is not None]
            primary = fed.task.primary_metric
            bar.set_postfix(
                **{primary: f"{g[primary]:.3f}"},
                loss=f"{g['loss']:.3f}",
                eps=f"{max(eps):.2f}" if eps else "off",
                applied=rec.applied,
            )
            if not rec.applied and progress:
                tqdm.write(f"round {r} not applied: {rec.data['error']}", file=sys.stderr)
        write_outputs(fed, partial)
        _finish(partial, target)
    except KeyboardInterrupt as exc:
        if not done and (partial / "checkpoint" / "checkpoint.json").exists():
            done = 1  # interrupted between round 1's checkpoint and its bookkeeping
        if done:
            raise RunInterrupted(f"interrupted: {_kept_line(partial, done)}") from exc
        _discard(partial, made or [])
        raise RunInterrupted("interrupted before the first round completed; nothing kept") from exc
    except Exception as exc:
        if not done:
            _discard(partial, made or [])
        elif partial.exists():
            _annotate(exc, _kept_line(partial, done))
        raise
    finally:
        _forget_features()
    return target


def _forget_features() -> None:
    """Drop cached image features (``scatter-linear``): no site's images outlive its run."""
    from securefed.models.scatter import clear_feature_cache

    clear_feature_cache()


def _annotate(exc: Exception, line: str) -> None:
    """Add where the completed rounds are to ``exc``'s one-line message (or as a note)."""
    if isinstance(exc, SecureFedError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} ({line})",)
    else:
        exc.add_note(line)
