"""Command line: parse options, call the library, print. Heavy imports happen inside commands.

Exit codes: 0 success, 2 bad input (one `error: ...` line on stderr).
"""

import sys

import click

from swtool import __version__

PROMPT_HELP = 'Detection prompt (default: the paper\'s "Apple Inc. is a worldwide tech company.").'
DOWNLOAD_HELP = ("A Hugging Face id missing from the local cache: download its config, tokenizer and "
                 "safetensors (only those).")


class SwtoolGroup(click.Group):
    """Turns SwtoolError (bad input) into one line and exit code 2."""

    def invoke(self, ctx):
        from swtool.errors import SwtoolError

        try:
            return super().invoke(ctx)
        except SwtoolError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # unreadable or unwritable paths, full disks
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(2)


@click.group(cls=SwtoolGroup)
@click.version_option(__version__, prog_name="swtool")
def main():
    """Find, catalog and handle the super weights of LLM checkpoints, on a CPU."""


@main.command()
@click.argument("model", type=click.Path())
@click.option("--prompt", default=None, help=PROMPT_HELP)
@click.option("--max-iter", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Zero what was found and rescan at most this many times.")
@click.option("--spike-ratio", default=10.0, show_default=True, type=click.FloatRange(min=1.0),
              help="A layer spikes when its max |down_proj output| is this many times the median layer's.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the catalog JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog JSON on stdout instead of a table.")
@click.option("--hash", "with_hashes", is_flag=True, help="Record the sha256 of every weight file.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--download", is_flag=True, help=DOWNLOAD_HELP)
def scan(model, prompt, max_iter, spike_ratio, output, as_json, with_hashes, no_progress, download):
    """Locate the super weights of MODEL.

    MODEL: a checkpoint directory, a .safetensors or .gguf file, or a Hugging Face id org/name[@revision].
    """
    from swtool.catalog import build_catalog, to_json, write_catalog
    from swtool.detect import Settings, scan as run_scan
    from swtool.model import load_model
    from swtool.tokenize import DEFAULT_PROMPT, encode

    prompt = DEFAULT_PROMPT if prompt is None else prompt
    loaded = load_model(model, download=download)
    tokens = encode(loaded.directory, prompt)
    settings = Settings(prompt=prompt, max_iter=max_iter, spike_ratio=spike_ratio)
    found, report = run_scan(loaded, tokens, settings, progress=not no_progress)
    catalog = build_catalog(loaded, prompt, tokens, settings, found, report, with_hashes)
    if output:
        write_catalog(catalog, output)
    if as_json:
        click.echo(to_json(catalog), nl=False)
    else:
        click.echo(format_scan(catalog))
        if output:
            click.echo(f"catalog written to {output}")


def format_scan(catalog):
    """The human table of a scan."""
    from swtool.table import format_table

    model, detection = catalog["model"], catalog["detection"]
    lines = [f"{model['path']}: {model['architecture']}, {model['num_layers']} layers, "
             f"prompt of {len(detection['tokens'])} tokens, {detection['passes']} passes"]
    sws = catalog["super_weights"]
    if not sws:
        lines.append("no super weight found: no down_proj output spike creates a persistent massive activation")
        return "\n".join(lines)
    mixture = any(sw.get("expert") is not None for sw in sws)  # name the expert only where there are experts
    header = ["layer", "row", "col"] + ["expert"] * mixture + ["tensor", "value", "dtype", "rank", "token", "input",
              "output", "SA", "SA -w", "SA -row", "NLL", "NLL -w", "NLL -row", "verified"]
    rows = []
    for sw in sws:
        v = sw["verification"]
        rows.append([sw["layer"], sw["row"], sw["col"]] + [sw.get("expert")] * mixture + [
                     sw["gguf_tensor"], f"{sw['value']:.4g}", sw["dtype"],
                     sw["rank"], sw["token"], f"{sw['input_activation']:.4g}", f"{sw['output_activation']:.4g}",
                     f"{v['super_activation_intact']:.4g}", f"{v['super_activation_removed']:.4g}",
                     f"{v['super_activation_set_removed']:.4g}", f"{v['nll_intact']:.3f}",
                     f"{v['nll_removed']:.3f}", f"{v['nll_set_removed']:.3f}", "yes" if v["verified"] else "weak"])
    lines.append(format_table(header, rows))
    if mixture:
        lines.append("expert: the mixture expert holding the weight; ffn_down_exps stacks experts, "
                     "the weight is its element [expert, row, col]")
    lines.append("input/output: down_proj activations at [token, col] / [token, row]; SA: super activation "
                 "|residual[token, row]| after the layer;\nNLL: the prompt's mean negative log-likelihood; "
                 "-w: with this weight zeroed; -row: with every super weight of this row and layer zeroed")
    lines.append(f"prompt NLL with all {len(sws)} removed: {detection['nll_intact']:.3f} -> "
                 f"{detection['nll_all_removed']:.3f}")
    return "\n".join(lines)


@main.command("audit")
@click.argument("model", type=click.Path())
@click.option("--catalog", type=click.Path(dir_okay=False), help="The super weights to check: a scan catalog.")
@click.option("--known", is_flag=True, help="Check the published super weights of the model (matched by id or config).")
@click.option("--known-id", metavar="ID", help="Check the published super weights of this model (see: swtool catalog known).")
@click.option("--reference", metavar="REF_MODEL",
              help="Compare with another checkpoint of the same model (e.g. the base of a fine-tune).")
@click.option("--tolerance", default=0.05, show_default=True, type=click.FloatRange(min=0.0),
              help="Largest relative change that still counts as intact.")
@click.option("--prompt", default=None, help=PROMPT_HELP + " Used when a scan is needed.")
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON on stdout.")
@click.option("--download", is_flag=True, help=DOWNLOAD_HELP)
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr (when a scan runs).")
def audit_command(model, catalog, known, known_id, reference, tolerance, prompt, as_json, download, no_progress):
    """Check that MODEL kept its super weights, reading only their bytes.

    Exit code 0: all intact within the tolerance; 1: any missing or damaged; 2: bad input.
    Without --catalog or --known, a GGUF's swtool.* metadata is used if present, else a scan runs.
    """
    import json

    from swtool.audit import audit as run_audit, format_report
    from swtool.errors import SwtoolError

    if catalog and (known or known_id):
        raise SwtoolError("give --catalog or --known/--known-id, not both")
    report = run_audit(model, catalog=catalog, known=known, known_id=known_id, reference=reference,
                       tolerance=tolerance, download=download, prompt=prompt, progress=not no_progress)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(format_report(report))
    sys.exit(0 if report.findings and not report.failed else 1)


@main.command("inspect")
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON on stdout.")
@click.option("--download", is_flag=True, help=DOWNLOAD_HELP)
def inspect_command(model, as_json, download):
    """Architecture, tensors, dtypes, sizes and files of MODEL, and what is known of its super weights."""
    import json

    from swtool.describe import describe, format_description

    info = describe(model, download=download)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@main.group("catalog")
def catalog_group():
    """Super-weight catalogs."""


@catalog_group.command("known")
@click.option("--json", "as_json", is_flag=True, help="Print the data file (coordinates, sources, notes) as JSON.")
def catalog_known(as_json):
    """The super weights published for public models, with their sources."""
    import json

    from swtool.known import load
    from swtool.table import format_table

    data, models = load()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = []
    for model in models:
        for sw in model.super_weights:
            flag = " (disputed)" if sw.get("disputed") else ""
            rows.append([model.name, model.id, sw["layer"], sw["row"], sw["col"], "+".join(sw["sources"]) + flag])
    click.echo(format_table(["model", "id", "layer", "row", "col", "sources"], rows))
    click.echo("coordinates: model.layers[layer].mlp.down_proj.weight[row, col], 0-based; sources:")
    for key, text in data["sources"].items():
        click.echo(f"  {key}: {text}")
    for model in models:
        if model.notes:
            click.echo(f"{model.name}: {model.notes}")
