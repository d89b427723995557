"""``python -m solq_d2.data [NAME ...]``: generate registered shapes datasets (default: the
built-in splits) and print their statistics as Markdown tables (see docs/datasets.md)."""

import argparse
import time

from detectron2.data import MetadataCatalog

from . import BUILTIN_SHAPES, prepare_dataset, shapes_statistics


def _table(name: str, stats: dict) -> str:
    lines = [
        f"**{name}**: {stats['images']} images ({stats['min_side']}-{stats['max_side']} px a side, "
        f"{stats['empty_images']} without objects), {stats['instances']} instances "
        f"(up to {stats['max_instances_per_image']} per image; {stats['rle_annotations']} as RLE)",
        "",
        "| class | small (< 32²) | medium | large (≥ 96²) | total |",
        "|---|---:|---:|---:|---:|",
    ]
    for cls, b in list(stats["by_class"].items()) + [("all", stats["by_bucket"])]:
        lines.append(f"| {cls} | {b['small']} | {b['medium']} | {b['large']} | {sum(b.values())} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(BUILTIN_SHAPES), help="dataset names")
    args = parser.parse_args(argv)
    for name in args.names:
        start = time.perf_counter()
        prepare_dataset(name)
        meta = MetadataCatalog.get(name)
        print(f"{name}: {meta.json_file} (ready in {time.perf_counter() - start:.1f} s)\n")
        print(_table(name, shapes_statistics(meta.json_file)) + "\n")


if __name__ == "__main__":
    main()
