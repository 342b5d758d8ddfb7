"""Per-layer activation profiles as a picture (the paper's Figure 4): matplotlib, an optional extra.

    pip install 'swtool[plot]'
"""

from itertools import cycle

from swtool.atomic import atomic_path
from swtool.errors import SwtoolError

FORMATS = ("png", "svg", "pdf")


def require_matplotlib(path):
    """Fail early, before a long pass, if the plot cannot be written."""
    suffix = str(path).rsplit(".", 1)[-1].lower() if "." in str(path) else ""
    if suffix not in FORMATS:
        raise SwtoolError(f"--plot {path}: name the file .png, .svg or .pdf")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SwtoolError("--plot needs matplotlib, an optional extra: pip install 'swtool[plot]'") from None


def _pyplot(path):
    """matplotlib.pyplot without a display, after checking `path` can be written (require_matplotlib)."""
    require_matplotlib(path)
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path):
    """Lay out `figure`, write it atomically in the format its name says, and free it."""
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=str(path).rsplit(".", 1)[-1].lower())
    plt.close(figure)


def plot_profiles(path, profiles, title, ylabel="max |down_proj output|"):
    """profiles {label: [value per layer]} as lines over the layers, log y-axis; written atomically."""
    plt = _pyplot(path)

    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=120)
    for (label, values), marker in zip(profiles.items(), cycle("osD^v<>x+*")):  # every profile, however many
        axes.plot(range(len(values)), values, marker=marker, markersize=3.5, linewidth=1.2, label=label)
    axes.set_yscale("log")
    axes.set_xlabel("layer")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8)
    _save(plt, figure, path)


def plot_quantsim(path, result, title):
    """`swtool quantsim --plot`: perplexity per block size, RTN and super-weight-aware, next to the
    unquantized model; with --activations a second panel of the int8 activation settings."""
    plt = _pyplot(path)

    panels = [key for key in ("weights", "activations") if key in result]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.4, 3.4), dpi=100, squeeze=False,
                                gridspec_kw={"width_ratios": [2 if p == "weights" else 1 for p in panels]})
    base = result["baseline"]["perplexity"]
    for ax, panel in zip(axes[0], panels):
        if panel == "weights":
            settings = result["weights"]["settings"]
            sizes = list(dict.fromkeys(s["block_size"] for s in settings))
            for method, label, marker in (("rtn", "RTN", "o"), ("aware", f"clip {result['weights']['clip']} + restore SW", "s")):
                values = [s["perplexity"] for s in settings if s["method"] == method]
                ax.plot(range(len(sizes)), values, marker=marker, markersize=4, linewidth=1.2, label=label)
            ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
            ax.set_xlabel("block size (elements)")
            ax.set_title(f"INT{result['weights']['bits']} weights", fontsize=9)
        else:
            settings = result["activations"]["settings"]
            ax.bar(range(len(settings)), [s["perplexity"] for s in settings], color=["C7", "C0", "C1"])
            ax.set_xticks(range(len(settings)), ["none", "int8", "int8 +\nSA kept"], fontsize=8)
            ax.set_title("INT8 activations (weights as stored)", fontsize=9)
        ax.axhline(base, color="gray", linestyle="--", linewidth=1, label=f"unquantized {base:.2f}")
        if panel == "weights":
            ax.set_yscale("log")  # block sizes span orders of magnitude of perplexity
        ax.set_ylabel("perplexity")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    _save(plt, figure, path)


def plot_sweep(path, result, title):
    """`swtool sweep --plot`: perplexity in llama.cpp against bits per weight, one line per handling,
    each type a point (labelled on the `none` line), the source's perplexity as a dashed line."""
    plt = _pyplot(path)

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    handlings = list(dict.fromkeys(row.handling for row in result.rows))
    for handling, marker in zip(handlings, "osD^v<>x+*"):
        rows = sorted((row for row in result.rows if row.handling == handling), key=lambda row: row.bits_per_weight)
        axes.plot([row.bits_per_weight for row in rows], [row.perplexity for row in rows], marker=marker,
                  markersize=4, linewidth=1.1, label=handling)
        if handling == "none":  # name each type once, beside its plain file
            for row in rows:
                axes.annotate(row.type, (row.bits_per_weight, row.perplexity), textcoords="offset points",
                              xytext=(4, 4), fontsize=7)
    axes.axhline(result.source_perplexity, color="gray", linestyle="--", linewidth=1,
                 label=f"source (swtool eval) {result.source_perplexity:.2f}")
    from matplotlib.ticker import ScalarFormatter

    axes.set_xscale("log", base=2)  # spreads the crowded 4-6 bits against f16's 16
    axes.set_yscale("log")  # 2-bit files are several times worse than the rest
    for axis in (axes.xaxis, axes.yaxis):  # plain numbers on both log axes
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    bits = [row.bits_per_weight for row in result.rows]
    axes.set_xticks([t for t in (2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32) if 0.9 * min(bits) <= t <= 1.1 * max(bits)])
    axes.tick_params(which="both", labelsize=7)
    axes.set_xlabel("bits per weight (llama.cpp's BPW)")
    axes.set_ylabel("perplexity in llama.cpp")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    _save(plt, figure, path)


def plot_scan(path, model, report):
    """The paper's Figure 4 for one prompt: max |down_proj output| per layer, intact and without the found weights."""
    profiles = {"original": [abs(e["down_proj_output"]["value"]) for e in report["profile"]]}
    if report.get("profile_removed"):
        profiles["super weights removed"] = [abs(e["down_proj_output"]["value"]) for e in report["profile_removed"]]
    plot_profiles(path, profiles, f"{model.path}: max |down_proj output| per layer (scan prompt)")


def plot_eval(path, result, title):
    """Each eval world's max |down_proj output| per layer, --sweep's scaled worlds included."""
    plot_profiles(path, {w["name"]: w["peak_down_proj_output"] for w in result["worlds"]}, title)
