"""``hydraulis profile DATA``: the length distribution of a dataset and where its time goes."""

from __future__ import annotations

import argparse

HELP = "a dataset's length distribution and where its time goes (JSON, plots)"
DESCRIPTION = """\
Read the sequence lengths of a dataset — Parquet, JSON lines, Arrow/Feather or a
datasets.save_to_disk folder — from a token-id list column, an integer length column, or
a text column counted with a local tokenizer file (--tokenizer tokenizer.json). Writes
OUT/profile.json (a balancer.profile.LengthProfile: histogram, quantiles, token totals),
OUT/length_histogram.png and OUT/time_share.png, and prints a summary.

The time share uses a cost model t(s) = a·s² + b·s: --model (analytic, on --hardware,
default h100-80g) or --cost-model FILE.

examples:
  hydraulis profile train.parquet
  hydraulis profile corpus.jsonl --column text --tokenizer tokenizer.json --model llama-7b
  hydraulis profile ./my_dataset --split train --out profile/"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="Parquet/JSONL/Arrow file or a save_to_disk folder")
    p.add_argument("--column", help="column of token ids, lengths or text (default: detected)")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json to count the tokens of a text column")
    p.add_argument("--no-special-tokens", action="store_true",
                   help="count text tokens without the tokenizer's BOS/EOS (default: with them)")
    p.add_argument("--split", help="split of a DatasetDict folder (default: train)")
    p.add_argument("--model", metavar="M", help="model preset or file for the time share (default: llama-7b)")
    p.add_argument("--hardware", default="h100-80g", metavar="H", help="hardware preset or file (default: h100-80g)")
    p.add_argument("--cost-model", metavar="FILE", help="cost-model JSON instead of --model/--hardware")
    p.add_argument("--layout", help="layout whose a, b price the time share (default: the smallest the model fits)")
    p.add_argument("--out", default="hydraulis-profile", metavar="DIR", help="output folder (default: hydraulis-profile)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _time_cost(args: argparse.Namespace) -> tuple[float, float, float, str]:
    """``(a, b, d, label)`` of the layout that prices the time share."""
    from balancer.cost import CostModel, UnsupportedLayoutError
    from hydraulis.config import resolve_hardware, resolve_model
    from strategies.layout import Layout

    if args.cost_model:
        if args.model:
            raise ValueError("give either --model or --cost-model, not both")
        cost = CostModel.load(args.cost_model)
        name = f"cost model {args.cost_model}"
    else:
        cost = CostModel.analytic(resolve_model(args.model or "llama-7b"), resolve_hardware(args.hardware))
        name = f"{cost.meta['model']['name']} on {cost.meta['hardware']['name']}"
    if args.layout:
        lay = Layout.parse(args.layout)
        c = cost.cost(lay)
        return c.a, c.b, c.d, f"{name}, {lay.name}"
    tried = [Layout(tp=t) for t in (1, 2, 4, 8)] + [Layout(tp=8, cp=c) for c in (2, 4, 8)]
    if cost.layouts:
        tried = cost.layouts + tried
    for lay in tried:
        try:
            c = cost.cost(lay)
        except UnsupportedLayoutError:
            continue
        return c.a, c.b, c.d, f"{name}, {lay.name}"
    raise ValueError(f"{name} prices none of {', '.join(t.name for t in tried)}; pass --layout")


def run(args: argparse.Namespace) -> int:
    import time

    from balancer.profile import LengthProfile
    from dataloader.sources import read_dataset_lengths
    from hydraulis.plots import doubling_shares, plot_length_histogram, plot_time_share

    from ._common import format_table, output_dir

    a, b, d, cost_label = _time_cost(args)  # validate the model before reading a large dataset
    out = output_dir(args.out)
    t0 = time.perf_counter()
    src = read_dataset_lengths(
        args.data, column=args.column, tokenizer=args.tokenizer, split=args.split,
        add_special_tokens=not args.no_special_tokens, progress=False if args.quiet else None,
    )
    seconds = time.perf_counter() - t0
    prof = LengthProfile.from_lengths(src.lengths, source=src.path, **src.describe(),
                                      time_share={"cost": cost_label, "a": a, "b": b, "d": d})
    shares = doubling_shares(prof, a, b, d)
    prof.save(out / "profile.json")

    how = {"tokens": "token-id lengths", "lengths": "integer lengths", "text": f"text tokenised with {src.tokenizer}"}
    print(f"{src.path}: {src.num_rows:,} rows ({src.format}), column {src.column!r}: {how[src.kind]}"
          f" — read in {seconds:.1f} s")
    if src.skipped_empty:
        print(f"skipped {src.skipped_empty:,} empty rows (0 tokens)")
    print()
    print(format_table(["", "value"], prof.summary_rows()))
    print()
    rows = [
        [lab, f"{100 * s:.1f}%", f"{100 * t:.1f}%", f"{100 * x:.1f}%"]
        for lab, s, t, x in zip(shares.labels(), shares.sequences, shares.tokens, shares.time)
    ]
    print(f"where the time goes ({cost_label}: t(s) = a·s² + b·s + d):")
    print(format_table(["length (tokens)", "sequences", "tokens", "est. time"], rows))
    p90 = prof.quantiles.get("p90", prof.max_length)
    seq, tok, tim = shares.above(1 << max(0, int(p90).bit_length()))
    if seq > 0:
        cut = 1 << max(0, int(p90).bit_length())
        print(f"\nsequences of {cut:,}+ tokens: {100 * seq:.1f}% of sequences, {100 * tok:.1f}% of tokens, "
              f"{100 * tim:.1f}% of the estimated time")
    written = [out / "profile.json"]
    if not args.no_plots:
        written.append(plot_length_histogram(prof, out / "length_histogram.png"))
        written.append(plot_time_share(shares, out / "time_share.png", cost_label))
    print("\nwrote " + ", ".join(str(w) for w in written))
    return 0
