"""``sites``: how many parameters each surgery site of a block holds."""

from __future__ import annotations

import argparse

from ..arch import SITE_DESCRIPTIONS, SITES, count_parameters
from ..core.errors import InputError
from .common import add_device_arg, add_model_arg, load, parse_layer, print_json


def register(sub) -> None:
    p = sub.add_parser(
        "sites",
        help="parameter counts of the four surgery sites of one block",
        description="Sizes of the sites surgery can train in block N: wv (the value "
        "projection), attn, mlp, and the whole layer.",
    )
    add_model_arg(p)
    p.add_argument("--layer", required=True, help="block index, 0-indexed (transformer.h.N, model.layers.N)")
    p.add_argument("--json", action="store_true", help='print {"wv": n, "attn": n, "mlp": n, "layer": n}')
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    layer = parse_layer(args.layer)
    if layer is None:
        raise InputError("sites needs a block index for --layer (0, 1, ...), not auto")
    loaded = load(args)
    layout = loaded.layout
    layout.check_layer(layer)
    sizes = {site: layout.site_size(loaded.model, site, layer) for site in SITES}
    if args.json:
        print_json(sizes)
        return 0
    total = count_parameters(loaded.model)
    print(
        f"sites of block {layer}: {layout.label(layer, path=True)}, {layout.family}; model total {total:,} parameters"
    )
    for site in SITES:
        print(f"  {site:<6}{sizes[site]:>14,}  {100 * sizes[site] / total:6.2f}%  {SITE_DESCRIPTIONS[site]}")
    return 0
