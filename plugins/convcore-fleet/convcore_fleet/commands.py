"""``convcore batch`` and ``convcore registry``: the fleet's commands, added to the CLI
group by :func:`register`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from convcore.fidelity import CHECK_FAILED_EXIT
from convcore.model import ConvcoreError
from convcore.options import parse_pairs
from convcore.registry import get_registry


def register(cli: click.Group) -> None:
    """Add ``batch`` and the ``registry`` group to ``cli``."""
    @cli.command()
    @click.argument("jobs_file", metavar="JOBS.toml", type=click.Path(path_type=Path))
    @click.option("--jobs", "parallel", type=int, help="Jobs at once (default: the file's, or cores and memory).")
    @click.option("--executor", default="local", show_default=True,
                  help="Where jobs run: local, ray, or another installed executor.")
    @click.option("-X", "--executor-option", "executor_options", multiple=True, metavar="KEY=VALUE",
                  help="An option of the executor (e.g. -X memory=8G, -X address=auto).")
    @click.option("--force", is_flag=True, help="Redo finished jobs and replace outputs not made by this batch.")
    @click.option("--dry-run", is_flag=True, help="List the jobs and what would be skipped; run nothing.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress display.")
    def batch(jobs_file: Path, parallel: int | None, executor: str, executor_options: tuple[str, ...],
              force: bool, dry_run: bool, as_json: bool, quiet: bool) -> None:
        """Run a fleet of conversions (models x targets x types) from JOBS.toml; record them in
        the model registry. Finished jobs are skipped on a rerun; exit 1 if any job failed
        (3 if the only failures were --check results beyond tolerance)."""
        from . import batch as fleet_batch

        run = fleet_batch.Batch(jobs_file, executor=executor, parallel=parallel,
                                executor_options=parse_pairs(executor_options, "--executor-option"),
                                force=force, progress=not quiet)
        if dry_run:
            plan = run.plan
            click.echo(json.dumps({"out": str(plan.out), "registry": str(plan.registry),
                                   "jobs": [j.to_dict() for j in plan.jobs]}, indent=2)
                       if as_json else "\n".join(f"{j.id}  ->  {j.dst}" for j in plan.jobs))
            return
        summary = run.run()
        click.echo(json.dumps(summary, indent=2, default=str) if as_json else fleet_batch.table(summary))
        failed = [r for r in summary["jobs"] if r["status"] not in ("ok", "skipped")]
        if failed:
            only_checks = all(r["status"] == "check-failed" for r in failed)
            click.echo(f"error: {len(failed)} of {len(summary['jobs'])} jobs failed "
                       f"(first: {failed[0]['id']}: {failed[0]['error']})", err=True)
            raise SystemExit(CHECK_FAILED_EXIT if only_checks else 1)


    @cli.group()
    def registry() -> None:
        """Show and edit a model registry (model_registry.json)."""


    @registry.command("list")
    @click.argument("registry_file", metavar="REGISTRY", type=click.Path(path_type=Path))
    @click.option("--json", "as_json", is_flag=True, help="JSON output.")
    def registry_list(registry_file: Path, as_json: bool) -> None:
        """Every model and its variants."""
        from . import registry as model_registry

        data = model_registry.read(registry_file)
        if as_json:
            click.echo(json.dumps(data, indent=2))
            return
        for model in data["models"]:
            meta = model["metadata"]
            params = f"{meta['parameters'] / 1e6:.2f}M params" if meta.get("parameters") else "? params"
            click.echo(f"{model['id']}  ({meta.get('architecture') or '?'}, {params}, "
                       f"context {meta.get('context_length') or '?'}, licence {meta.get('license') or '?'})")
            for v in model["variants"]:
                check = v.get("check") or {}
                kl = f"  KL {check['kl_mean']:.2e}" if "kl_mean" in check else ""
                click.echo(f"  {model['id']}/{v['id']}  {v['size_mb']:.1f} MB  {v['file']}{kl}")


    @registry.command("show")
    @click.argument("registry_file", metavar="REGISTRY", type=click.Path(path_type=Path))
    @click.argument("ident", metavar="MODEL[/VARIANT]")
    def registry_show(registry_file: Path, ident: str) -> None:
        """One model (or one of its variants) as JSON."""
        from . import registry as model_registry

        model, variant = model_registry.find(model_registry.read(registry_file), ident)
        click.echo(json.dumps(variant if variant is not None else model, indent=2))


    @registry.command("add")
    @click.argument("registry_file", metavar="REGISTRY", type=click.Path(path_type=Path))
    @click.argument("path", type=click.Path(path_type=Path))
    @click.option("--model", "model_id", required=True, help="The model's id (created when new).")
    @click.option("--variant", "variant_id", help="The variant's id (default: FORMAT-QUANT).")
    @click.option("--format", "fmt", metavar="FMT", help="PATH's format (detected when omitted).")
    @click.option("--quant", help="The type PATH holds (recorded as given).")
    @click.option("--name", help="The model's display name.")
    @click.option("--source", help="Where the model came from (path, hub id or URL).")
    @click.option("--license", "license_", help="The model's licence.")
    def registry_add(registry_file: Path, path: Path, model_id: str, variant_id: str | None,
                     fmt: str | None, quant: str | None, name: str | None, source: str | None,
                     license_: str | None) -> None:
        """Record PATH (a converted model under the registry's folder) as a variant."""
        from . import registry as model_registry
        from .worker import model_info, output_digest, output_files

        reg = get_registry()
        fmt = fmt or reg.detect(path)
        problems = reg.validate(path, fmt)
        if problems:
            raise ConvcoreError(f"{path}: not a valid {fmt} model: {problems[0]}")
        model_registry.relative(path, registry_file)  # inside the registry's folder
        data = model_registry.read(registry_file, missing_ok=True)
        directory = reg.format(fmt).directory
        files = output_files(path, path, directory)
        root = path if directory else path.parent
        info = model_info(reg, path, fmt)
        if license_:
            info["license"] = license_
        variant = {"id": variant_id or f"{fmt}-{quant or 'native'}", "format": fmt,
                   "file": model_registry.relative(path, registry_file),
                   "files": [model_registry.relative(p, registry_file) for p in files],
                   "size_mb": round(sum(p.stat().st_size for p in files) / 1e6, 3), "quant": quant,
                   "sha256": output_digest(files, root), "check": None, "created": model_registry.now()}
        model_registry.upsert(data, {"id": model_id, "name": name, "source": source or str(path),
                                     "metadata": info}, variant)
        model_registry.write(registry_file, data)
        click.echo(f"{registry_file}: {model_id}/{variant['id']} -> {variant['file']}")


    @registry.command("validate")
    @click.argument("registry_file", metavar="REGISTRY", type=click.Path(path_type=Path))
    def registry_validate(registry_file: Path) -> None:
        """Check REGISTRY against the schema; exit 0 when valid."""
        from . import registry as model_registry

        data = model_registry.read(registry_file)
        click.echo(f"{registry_file}: valid ({len(data['models'])} models, "
                   f"{sum(len(m['variants']) for m in data['models'])} variants)")


    @registry.command("schema")
    def registry_schema() -> None:
        """Print the registry's JSON Schema."""
        from . import registry as model_registry

        click.echo(model_registry.SCHEMA_PATH.read_text(encoding="utf-8"), nl=False)
