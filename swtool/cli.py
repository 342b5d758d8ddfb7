"""Command line: parse options, call the library, print. Heavy imports happen inside commands.

Exit codes: 0 success, 2 bad input (one `error: ...` line on stderr).
"""

import sys

import click

from swtool import __version__

PROMPT_HELP = 'Detection prompt (default: the paper\'s "Apple Inc. is a worldwide tech company.").'
FORCE_HELP = "Replace output files that already exist (without it, an existing output is an error)."
DOWNLOAD_HELP = ("A Hugging Face id missing from the local cache: download its config, tokenizer and "
                 "safetensors (only those).")


class SwtoolGroup(click.Group):
    """Turns SwtoolError (bad input) into one line and exit code 2; --debug adds the traceback.

    SIGINT, SIGTERM and SIGHUP unwind as exceptions, so every output being written
    is removed (swtool/atomic.py) before the one line and exit code 128 + signal.
    """

    def parse_args(self, ctx, args):
        """--debug is the group's option, but users type it anywhere: moved to the front (not past `--`)."""
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug"] + [a for a in args[:end] if a != "--debug"] + args[end:]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        from swtool.atomic import Terminated, install_signal_handlers
        from swtool.errors import SwtoolError

        install_signal_handlers()
        for stream in (sys.stdout, sys.stderr):  # a path or token that is not valid UTF-8 prints escaped
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        try:
            return super().invoke(ctx)
        except SwtoolError as e:
            fail(ctx, str(e), 2)
        except click.UsageError as e:  # a missing or malformed option: one line too, not click's usage block
            fail(ctx, e.format_message(), 2)
        except OSError as e:  # unreadable or unwritable paths, full disks
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(ctx, f"{where}{e.strerror or e}", 2)
        except KeyboardInterrupt:
            fail(ctx, "interrupted (SIGINT); outputs in progress were removed", 130)
        except Terminated as e:
            fail(ctx, f"terminated ({e.name}); outputs in progress were removed", 128 + e.signum)


def run():
    """The `swtool` console script: main(), then leave without Python's interpreter teardown.

    Once numba has been loaded, tearing the interpreter down (its modules, their objects,
    LLVM) takes about 0.1 s on the benchmark machine: a sixth of a small scan, for no
    output. So after the command has finished and stdout and stderr are flushed, the
    process ends with os._exit and the command's exit code. Every output file is complete
    and renamed into place before a command returns (swtool/atomic.py), and swtool runs no
    background threads, so nothing is cut short. main() itself, as tests and bench scripts
    call it in process, still raises SystemExit as click does.

    The cyclic garbage collector's youngest generation is collected every 10,000 new
    container objects instead of Python's 700, so the older ones, collected every tenth
    time, are rescanned less: importing numba and loading its first kernel create
    hundreds of thousands of objects, and rescanning them took 68 ms of a Llama-7B-shape
    scan's 2.4 s, 31 ms with these thresholds (measured with gc.callbacks, same scan).
    Cycles are still collected, in fewer, larger batches.
    """
    import gc
    import os

    gc.set_threshold(10_000, 10, 10)
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):  # SystemExit("message") or SystemExit(None), as sys.exit has them
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: let the interpreter report it as usual
        sys.exit(code)
    os._exit(code)


def fail(ctx, message, code):
    """One `error: ...` line on stderr (after the traceback with --debug), then exit `code`."""
    if ctx.params.get("debug"):
        import traceback

        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def output_options(json_help=None, progress_help="No progress bar on stderr.", force_help=FORCE_HELP):
    """The output options commands share: --json, --no-progress, --force (None leaves one out)."""
    flags = [("--force", "force", force_help), ("--no-progress", "no_progress", progress_help),
             ("--json", "as_json", json_help)]

    def decorate(command):
        for flag, name, help_text in flags:
            if help_text:
                command = click.option(flag, name, is_flag=True, help=help_text)(command)
        return command

    return decorate


def prepare_outputs(force, *paths, plot=None, inputs=()):
    """Before any work: an output that is one of the `inputs`' files, or named twice, is refused;
    an existing output is refused unless --force; a plot needs matplotlib."""
    from swtool.atomic import check_destination, refuse_replacing_inputs

    refuse_replacing_inputs((*paths, plot), inputs)
    if plot:
        from swtool.plot import require_matplotlib

        require_matplotlib(plot)
    for path in (*paths, plot):
        if path:
            check_destination(path, force)


@click.group(cls=SwtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="swtool")
@click.option("--debug", is_flag=True, help="On an error, print the Python traceback before the one-line message.")
def main(debug):
    """Find, catalog and handle the super weights of LLM checkpoints, on a CPU."""


@main.command()
@click.argument("model", type=click.Path())
@click.option("--prompt", default=None, help=PROMPT_HELP)
@click.option("--max-iter", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Zero what was found and rescan at most this many times.")
@click.option("--spike-ratio", default=10.0, show_default=True, type=click.FloatRange(min=1.0),
              help="A layer spikes when its max |down_proj output| is this many times the median layer's.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the catalog JSON here.")
@click.option("--hash", "with_hashes", is_flag=True, help="Record the sha256 of every weight file.")
@click.option("--download", is_flag=True, help=DOWNLOAD_HELP)
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write max |down_proj output| per layer, intact and without the found weights (.png/.svg/.pdf; "
                   "needs matplotlib).")
@click.option("--check-finite", is_flag=True,
              help="Read every weight once more and report tensors holding NaN or Inf (done anyway when the "
                   "scan's activations are not finite).")
@output_options(json_help="Print the catalog JSON on stdout instead of a table.")
def scan(model, prompt, max_iter, spike_ratio, output, as_json, with_hashes, no_progress, download, plot, check_finite,
         force):
    """Locate the super weights of MODEL.

    MODEL: a checkpoint directory, a .safetensors or .gguf file, or a Hugging Face id org/name[@revision].
    """
    import numpy as np

    from swtool.catalog import format_scan, scan_catalog, to_json, write_catalog
    from swtool.detect import Settings
    from swtool.finite import describe_nonfinite, nonfinite_weights, report_is_finite
    from swtool.model import load_model
    from swtool.tokenizer import DEFAULT_PROMPT

    prepare_outputs(force, output, plot=plot, inputs=(model,))
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    loaded = load_model(model, download=download)
    settings = Settings(prompt=prompt, max_iter=max_iter, spike_ratio=spike_ratio)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # non-finite weights are reported below
        catalog, report = scan_catalog(loaded, prompt, settings, progress=not no_progress, with_hashes=with_hashes)
    if check_finite or not report_is_finite(report):  # NaN/Inf weights: flagged, the scan still completes
        catalog["nonfinite_weights"] = nonfinite_weights(loaded.checkpoint)
        if catalog["nonfinite_weights"]:
            click.echo(f"warning: {model}: {describe_nonfinite(catalog['nonfinite_weights'])}", err=True)
    if output:
        write_catalog(catalog, output)
    if plot:
        from swtool.plot import plot_scan

        plot_scan(plot, loaded, report)
    if as_json:
        click.echo(to_json(catalog), nl=False)
    else:
        click.echo(format_scan(catalog))
        if output:
            click.echo(f"catalog written to {output}")
        if plot:
            click.echo(f"plot written to {plot}")


def _at_least_two(ctx, param, value):
    """--max-tokens: one prediction needs two tokens."""
    if value is not None and value < 2:
        raise click.UsageError(f"--max-tokens must be at least 2, got {value}")
    return value


def text_options(command):
    """The text-scoring options `eval` and `quantsim` share (applied bottom-up, so listed in reverse)."""
    options = [
        click.option("--score-second-half", is_flag=True,
                     help="Score only predictions from position ctx/2 on in each chunk (as llama-perplexity)."),
        click.option("--max-tokens", type=int, callback=_at_least_two, help="Score only the first N tokens of the text."),
        click.option("--ctx", default=512, show_default=True, type=int,
                     help="Tokens per chunk; each chunk is an independent sequence and every prediction in it "
                          "is scored."),
        click.option("--text", "text_path", required=True, type=click.Path(), help="UTF-8 text file to score."),
    ]
    for option in options:
        command = option(command)
    return command


@main.command("eval")
@click.argument("model", type=click.Path())
@text_options
@click.option("--zero", multiple=True, metavar="L:ROW:COL",
              help="Zero layer L's down_proj[ROW, COL] on the fly, in every world (repeatable).")
@click.option("--catalog", type=click.Path(),
              help="A scan catalog. Alone: compare the model with and without its super weights.")
@click.option("--ablate", is_flag=True, help="Evaluate with the catalog's super weights zeroed.")
@click.option("--scale-super", type=float, metavar="S", help="Evaluate with the catalog's super weights times S.")
@click.option("--control-top", type=int, metavar="N",
              help="Compare: the N largest-|w| weights other than the super weights zeroed (the paper's control).")
@click.option("--restore-activation", is_flag=True,
              help="Compare: super weights zeroed, the super activation written back (the paper's restore).")
@click.option("--sweep", metavar="S,S,..", help="Compare: super weights scaled by each factor, e.g. 0,0.5,1,1.5,2,3.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write each world's max |down_proj output| per layer as .png/.svg/.pdf (needs matplotlib).")
@click.option("--batch-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Rows x ctx of one pass; a longer text (or more worlds) takes several passes.")
@output_options(json_help="Print the result as JSON on stdout instead of a table.")
def eval_command(model, text_path, ctx, max_tokens, score_second_half, zero, catalog, ablate, scale_super,
                 control_top, restore_activation, sweep, plot, batch_tokens, as_json, no_progress, force):
    """Perplexity of a text through MODEL, with weights changed on the fly, and the paper's experiments."""
    from swtool.jsonfile import strict_json

    from swtool.ablate import CatalogMismatch
    from swtool.catalog import read_catalog
    from swtool.coordinate import Coordinate
    from swtool.errors import SwtoolError
    from swtool.evaluate import evaluate, make_chunks, text_token_ids
    from swtool.experiments import EvalOptions, build_plan, describe_eval, format_eval, parse_scales, stop_word_ids
    from swtool.model import load_model
    from swtool.tokenizer import load_tokenizer

    prepare_outputs(force, plot=plot, inputs=(model, text_path, catalog))  # before the pass, not after it
    options = EvalOptions(zero=tuple(Coordinate.parse(z) for z in zero),
                      super_weights=read_catalog(catalog)["super_weights"] if catalog else None,
                      ablate=ablate, scale_super=scale_super, control_top=control_top,
                      restore_activation=restore_activation, sweep=tuple(parse_scales(sweep)) if sweep else ())
    loaded = load_model(model)
    ids = text_token_ids(loaded.directory, text_path, max_tokens)
    chunks = make_chunks(ids, ctx, score_second_half)
    try:
        plan, report = build_plan(loaded, options, progress=not no_progress)
    except CatalogMismatch as e:
        raise SwtoolError(f"{catalog}: {e}") from None
    scores = evaluate(loaded, chunks, plan, progress=not no_progress, batch_tokens=batch_tokens)
    tokenizer = load_tokenizer(loaded.directory)
    result = describe_eval(loaded, text_path, len(ids), chunks, plan, report, scores, tokenizer,
                      stop_word_ids(tokenizer), options)
    if plot:
        from swtool.plot import plot_eval

        plot_eval(plot, result, f"{loaded.path}: max |down_proj output| per layer over {text_path}")
    if as_json:
        click.echo(strict_json(result))
    else:
        click.echo(format_eval(result))
        if plot:
            click.echo(f"plot written to {plot}")


@main.command("quantsim")
@click.argument("model", type=click.Path())
@text_options
@click.option("--bits", default=4, show_default=True, type=click.IntRange(2, 8), help="Weight bits (INT, min-max).")
@click.option("--block-sizes", default="32,128,1024,16384,tensor", show_default=True, metavar="N,N,..|tensor",
              help="Flat block sizes to compare (elements of W [out, in] in row-major order), or 'tensor'.")
@click.option("--clip", "clip_text", default="zscore:9", show_default=True, metavar="zscore:Z|percentile:P|none",
              help="Super-weight-aware clipping before quantization (the paper's zscore or tensor top fraction).")
@click.option("--catalog", type=click.Path(),
              help="A scan catalog (swtool scan -o); without it MODEL is scanned first with scan's defaults.")
@click.option("--activations", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="Also simulate per-tensor int8 inputs of the linears, with and without the super activation kept.")
@click.option("--no-weights", is_flag=True, help="Skip the weight table (with --activations int8).")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write perplexity per block size (and the activation settings) as .png/.svg/.pdf (needs matplotlib).")
@click.option("--batch-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Rows x ctx of one pass; a longer text takes several passes.")
@output_options(json_help="Print the result as JSON on stdout instead of tables.")
def quantsim_command(model, text_path, bits, block_sizes, clip_text, catalog, activations, no_weights, ctx, max_tokens,
                     score_second_half, plot, batch_tokens, as_json, no_progress, force):
    """Perplexity of MODEL with simulated quantization (no file written): block-wise INT weights, plain
    round-to-nearest vs super-weight-aware, and optionally int8 activations with the super activation kept."""
    from swtool.jsonfile import strict_json

    from swtool.quantsim import QuantsimOptions, parse_block_sizes, parse_clip

    options = QuantsimOptions(bits=bits, block_sizes=tuple(parse_block_sizes(block_sizes)), clip=parse_clip(clip_text),
                      weights=not no_weights, activations=activations)
    if not options.weights and options.activations == "none":
        raise click.UsageError("--no-weights leaves nothing to do without --activations int8")
    prepare_outputs(force, plot=plot, inputs=(model, text_path, catalog))  # before the passes, not after them
    from swtool.evaluate import make_chunks, text_token_ids
    from swtool.model import load_model
    from swtool.quantsim import describe_run, format_quantsim, run

    loaded = load_model(model)
    ids = text_token_ids(loaded.directory, text_path, max_tokens)
    chunks = make_chunks(ids, ctx, score_second_half)
    super_weights, source = quantsim_super_weights(loaded, catalog, not no_progress)
    result = describe_run(loaded, text_path, len(ids), chunks, source)
    result.update(run(loaded, chunks, super_weights, options, progress=not no_progress, batch_tokens=batch_tokens))
    if plot:
        from swtool.plot import plot_quantsim

        plot_quantsim(plot, result, f"{loaded.path}: perplexity on {text_path} ({result['tokens']} tokens)")
    if as_json:
        click.echo(strict_json(result))
    else:
        click.echo(format_quantsim(result))
        if plot:
            click.echo(f"plot written to {plot}")


def quantsim_super_weights(model, catalog, progress):
    """(catalog entries, where they came from): the catalog's, checked against MODEL element by element, or a scan's."""
    from swtool.ablate import CatalogMismatch, locate
    from swtool.catalog import super_weights_for
    from swtool.errors import SwtoolError

    found, source = super_weights_for(model, catalog, progress=progress)
    try:
        for sw in found["super_weights"] if catalog else ():
            locate(model.checkpoint, sw)
    except CatalogMismatch as e:
        raise SwtoolError(f"{catalog}: {e}") from None
    return found["super_weights"], source


@main.command()
@click.argument("model", type=click.Path())
@click.option("--catalog", type=click.Path(), help="The catalog whose super weights to change (swtool scan -o).")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Write the ablated copy to this new directory.")
@click.option("--scale", default=0.0, show_default=True, type=float, help="Multiply the super weights by this (0 removes them).")
@click.option("--only", multiple=True, metavar="L:ROW:COL", help="Only this catalog entry (repeatable).")
@click.option("--copy", is_flag=True, help="Copy unchanged files byte for byte instead of hard-linking them.")
@click.option("--in-place", is_flag=True, help="Patch MODEL itself (atomically, with a journal for --restore).")
@click.option("--restore", is_flag=True, help="Undo an --in-place ablation of MODEL from its journal.")
@output_options(json_help="Print what changed as JSON on stdout.", progress_help=None,
                force_help="Replace OUTDIR if it already exists (only an earlier ablate -o output).")
def ablate(model, catalog, output, scale, only, copy, in_place, restore, as_json, force):
    """Write a copy of MODEL with the catalog's super weights scaled (0 = removed); only their bytes differ."""
    from swtool.jsonfile import strict_json

    from swtool import ablate as ab
    from swtool.catalog import read_catalog
    from swtool.coordinate import Coordinate
    from swtool.checkpoint import open_checkpoint
    from swtool.errors import SwtoolError

    if restore:
        if catalog or output or in_place or only:
            raise click.UsageError("--restore takes only MODEL (the journal says what to undo)")
        journal = ab.restore_in_place(model)
        click.echo(strict_json(ab.describe_restore(model, journal)) if as_json else
                   f"{model}: restored {len(journal['changes'])} element(s) from {ab.JOURNAL_NAME}")
        return
    if not catalog:
        raise click.UsageError("--catalog is required (or --restore)")
    if bool(output) == in_place:
        raise click.UsageError("give exactly one of -o OUTDIR and --in-place")
    cat = read_catalog(catalog)
    chosen = ab.select(cat["super_weights"], [Coordinate.parse(o, "--only") for o in only])
    checkpoint = open_checkpoint(model)
    try:
        patches = ab.plan_patches(checkpoint, chosen, scale)
    except ab.CatalogMismatch as e:
        raise SwtoolError(f"{catalog}: {e}") from None
    done = None
    if in_place:
        ab.ablate_in_place(checkpoint, patches, scale, catalog)
        where = f"{model} patched in place; undo with: swtool ablate {model} --restore"
    else:
        done = ab.ablated_copy(checkpoint, cat, patches, scale, output, copy, force)
        where = (f"wrote {output}: {len(done['patched'])} file(s) patched, {len(done['linked'])} hard-linked, "
                 f"{len(done['copied'])} copied; what changed: {output}/{ab.CATALOG_NAME}")
    if as_json:
        click.echo(strict_json(ab.describe_ablation(model, catalog, scale, patches, output, done)))
        return
    click.echo(ab.format_patches(patches))
    click.echo(where)


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
@click.option("--download", is_flag=True, help=DOWNLOAD_HELP)
@output_options(json_help="Print the audit as JSON on stdout.", force_help=None,
                progress_help="No progress bar on stderr (when a scan runs).")
def audit_command(model, catalog, known, known_id, reference, tolerance, prompt, as_json, download, no_progress):
    """Check that MODEL kept its super weights, reading only their bytes.

    Exit code 0: all intact within the tolerance; 1: any missing, damaged, ablated or unprotected,
    or a broken model; 2: bad input (another model's catalog included); 3: no verdict, nothing to
    compare with. Without an option the reference is, first that applies: a GGUF's swtool.* metadata,
    the known table (swtool catalog known), a catalog of this model beside it; else a scan of the
    model itself, whose findings are unverified.
    """
    from swtool.jsonfile import strict_json

    from swtool.audit import audit as run_audit, format_audit
    from swtool.errors import SwtoolError

    if catalog and (known or known_id):
        raise SwtoolError("give --catalog or --known/--known-id, not both")
    report = run_audit(model, catalog=catalog, known=known, known_id=known_id, reference=reference,
                       tolerance=tolerance, download=download, prompt=prompt, progress=not no_progress)
    if as_json:
        click.echo(strict_json(report.to_json()))
    else:
        click.echo(format_audit(report))
    sys.exit(report.exit_code)


@main.command("inspect")
@click.argument("model", type=click.Path())
@click.option("--download", is_flag=True, help=DOWNLOAD_HELP)
@output_options(json_help="Print the description as JSON on stdout.", progress_help=None, force_help=None)
def inspect_command(model, as_json, download):
    """Architecture, tensors, dtypes, sizes and files of MODEL, and what is known of its super weights."""
    from swtool.jsonfile import strict_json

    from swtool.describe import describe_model, format_description

    info = describe_model(model, download=download)
    click.echo(strict_json(info) if as_json else format_description(info))


def gguf_options(command):
    """The options `export` and `quantize` share (applied bottom-up, so listed in reverse)."""
    command = output_options(json_help="Print what was written (or planned, with --dry-run) as JSON on stdout "
                                       "instead of tables.")(command)
    options = [
        click.option("--dry-run", is_flag=True,
                     help="Print every tensor's planned type, size and reason, and the notes; write nothing."),
        click.option("--pure", is_flag=True,
                     help="Every weight in --type: no mix rule and no output-tensor rule (as llama-quantize --pure)."),
        click.option("--leave-output-tensor", is_flag=True,
                     help="Keep output.weight in the type it is stored in (as llama-quantize)."),
        click.option("--token-embedding-type", metavar="TYPE",
                     help="Type of token_embd.weight (as llama-quantize); overrides the rules."),
        click.option("--output-tensor-type", metavar="TYPE",
                     help="Type of output.weight only (as llama-quantize; a --tensor-type 'output\\.weight' also "
                          "matches every attn_output.weight)."),
        click.option("--no-scan", is_flag=True,
                     help="Without --catalog (and, for a GGUF, without its own swtool.* record), do not scan the "
                          "model for its super weights: nothing is recorded or protected."),
        click.option("--allow-requantize", is_flag=True,
                     help="GGUF input: decode tensors that are already quantized and quantize them again (as "
                          "llama-quantize); the result is no better than the source's quantization."),
        click.option("--sw-handling", type=click.Choice(["keep", "isolate", "none"]), default="keep",
                     show_default=True,
                     help="keep: tensors holding a super weight in --keep-type; isolate: same type as the rest, "
                          "MLP channels reordered so each super weight has a block of near-zero neighbours; "
                          "none: plain quantization (the super weights are still recorded)."),
        click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
                     help="Type of the tensors whose llama.cpp name REGEX matches (re.search, first match wins; "
                          "repeatable), e.g. 'blk\\.2\\.ffn_down=q8_0'. Overrides --keep-type."),
        click.option("--keep-type", type=click.Choice(["f16", "bf16", "q8_0", "f32"], case_sensitive=False), default="q8_0",
                     show_default=True, help="Type of each tensor that holds a super weight (--sw-handling keep)."),
        click.option("--catalog", type=click.Path(dir_okay=False),
                     help="A scan catalog (swtool scan -o): its super weights are recorded and protected."),
        click.option("--type", "qtype", required=True, metavar="TYPE",
                     help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k, iq4_nl, iq4_xs, or a "
                          "llama-quantize mix: q3_k_s/m/l, q4_k_s/m, q5_k_s/m (any case). Unlike llama-quantize, where "
                          "Q3_K, Q4_K and Q5_K are aliases of the _M mixes and Q2_K is a mix, q2_k..q5_k here put every "
                          "weight in that one type."),
        click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .gguf file to write."),
    ]
    for option in options:
        command = option(command)
    return command


def export_options(opts):
    """The ExportOptions of export's and quantize's command line (gguf_options)."""
    from swtool.gguf_export import ExportOptions

    return ExportOptions(
        opts["qtype"], keep_type=opts["keep_type"].lower(), tensor_types=tuple(opts["tensor_types"]),
        handling=opts["sw_handling"], catalog=opts["catalog"], progress=not opts["no_progress"],
        allow_requantize=opts["allow_requantize"], scan=not opts["no_scan"],
        output_tensor_type=opts["output_tensor_type"], token_embedding_type=opts["token_embedding_type"],
        pure=opts["pure"], leave_output_tensor=opts["leave_output_tensor"], dry_run=opts["dry_run"])


def print_export(report, source, opts):
    """export's and quantize's summary: the tables, or with --json describe_export."""
    from swtool.gguf_export import describe_export, format_export
    from swtool.jsonfile import strict_json

    click.echo(strict_json(describe_export(report, source, export_options(opts))) if opts["as_json"]
               else format_export(report))


@main.command("export")
@click.argument("model", type=click.Path())
@gguf_options
def export_command(model, **opts):
    """Write MODEL (a Hugging Face checkpoint, or a GGUF file to change its type) as a GGUF file for llama.cpp.

    Without --catalog, MODEL is scanned first and the super weights it finds are recorded and protected.
    """
    prepare_outputs(opts["force"], opts["output"], inputs=(model, opts["catalog"]))  # before anything is read
    from swtool.gguf_export import export

    print_export(export(model, opts["output"], export_options(opts)), model, opts)


@main.command("quantize")
@click.argument("gguf_file", metavar="IN.GGUF", type=click.Path(dir_okay=False))
@gguf_options
def quantize_command(gguf_file, **opts):
    """Quantize a GGUF file to another type; all its metadata and vocabulary are copied.

    The super weights protected are, first that applies: --catalog's, those the file records
    (swtool.* metadata of a swtool export), or a scan of the file. Tensors already quantized are
    re-quantized only with --allow-requantize.
    """
    prepare_outputs(opts["force"], opts["output"], inputs=(gguf_file, opts["catalog"]))  # before anything is read
    from swtool.gguf_export import quantize_gguf

    print_export(quantize_gguf(gguf_file, opts["output"], export_options(opts)), gguf_file, opts)


@main.command("sweep")
@click.argument("model", type=click.Path())
@click.option("--text", "text_path", required=True, type=click.Path(), help="UTF-8 text file to score.")
@click.option("--types", default="q2_k,q3_k,q4_0,q4_k,q5_k,q6_k,q8_0", show_default=True, metavar="T,T,..",
              help="Export types (as swtool export --type), comma-separated.")
@click.option("--handlings", default="none,keep:q8_0,control:q8_0", show_default=True, metavar="H,H,..",
              help="none, keep[:TYPE] (--sw-handling keep --keep-type TYPE), isolate, control[:TYPE] (the same "
                   "bytes spent on ffn_down tensors without a super weight); TYPE: f16, bf16, q8_0, f32.")
@click.option("--catalog", type=click.Path(dir_okay=False),
              help="A scan catalog (swtool scan -o); without it, MODEL is scanned first with scan's defaults.")
@click.option("--ctx", default=512, show_default=True, type=int,
              help="Tokens per window; each window is an independent sequence and every prediction is scored.")
@click.option("--windows", "n_windows", type=click.IntRange(min=1),
              help="Score the first N windows of ctx tokens (default: every full window of the text).")
@click.option("--out-dir", type=click.Path(file_okay=False),
              help="Keep the GGUF files (and a scanned catalog) here; by default they go to a temporary "
                   "directory that is removed.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="llama.cpp threads (one keeps runs on a busy machine comparable).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write the result as JSON to this file.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write perplexity against bits per weight, a line per handling, as .png/.svg/.pdf (needs matplotlib).")
@output_options(json_help="Print the result as JSON on stdout instead of a table.",
                progress_help="No progress lines or bars on stderr.",
                force_help="Replace -o, --plot and files of the same names in --out-dir.")
def sweep_command(model, text_path, types, handlings, catalog, ctx, n_windows, out_dir, threads, output, plot,
                  as_json, no_progress, force):
    """Export MODEL at several GGUF types, with and without super-weight handling; perplexity of each in llama.cpp.

    Needs llama-cpp-python: pip install 'swtool[llama]'.
    """
    from swtool.jsonfile import strict_json
    from swtool.llama_score import require_llama

    require_llama("swtool sweep")  # before anything is read or exported
    from swtool.sweep import format_sweep, parse_handlings, parse_types, run_sweep

    type_names, handling_list = parse_types(types), parse_handlings(handlings)
    prepare_outputs(force, output, plot=plot, inputs=(model, text_path, catalog))  # before the exports
    from swtool.evaluate import read_text

    text = read_text(text_path)

    def log(line):
        if not no_progress:
            click.echo(line, err=True)

    result = run_sweep(model, text_path, text, type_names, handling_list, catalog, ctx, n_windows, out_dir,
                       threads, force, not no_progress, log)
    if output:
        from swtool.atomic import write_text_atomic

        write_text_atomic(output, strict_json(result.to_json()) + "\n")
    if plot:
        from swtool.plot import plot_sweep

        plot_sweep(plot, result, f"{model}: {text_path}, {result.windows} x {result.ctx} tokens")
    click.echo(strict_json(result.to_json()) if as_json else format_sweep(result))
    if plot and not as_json:
        click.echo(f"plot written to {plot}")


@main.group("catalog")
def catalog_group():
    """Super-weight catalogs."""


@catalog_group.command("known")
@output_options(json_help="Print the data file (coordinates, sources, notes) as JSON.", progress_help=None,
                force_help=None)
def catalog_known(as_json):
    """The super weights published for public models, with their sources."""
    from swtool.jsonfile import strict_json

    from swtool.known import format_known, load

    data, models = load()
    click.echo(strict_json(data) if as_json else format_known(data, models))
