"""Run `build_store` in its own process: the kill -9, SIGTERM and two-process sharded tests
start this.

Usage: python store_worker.py IMAGES STORE WEIGHTS [--shard i/n] [--delay S] [--image-size N]
       [--batch-size N] [--shard-rows N] [--max-shard-seconds S] [--log-every N]
`--delay` sleeps that long per image read, so that a test can kill the run part-way. An
EmbedError ends the process as `invoke` does: the message on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from common.files import sha256_file  # noqa: E402
from embed.config import EmbedConfig  # noqa: E402
from embed.errors import EmbedError  # noqa: E402
from embed.pipeline import build_store  # noqa: E402
from embed.sources import FolderSource  # noqa: E402
from embed.weights import WeightsInfo  # noqa: E402

__all__ = ["main"]


class _SlowFolder(FolderSource):
    def __init__(self, root, delay: float):
        super().__init__(root)
        self.delay = delay

    def read_bytes(self, image_id: str) -> bytes:
        time.sleep(self.delay)
        return super().read_bytes(image_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("images", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("weights", type=Path)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-rows", type=int, default=8)
    parser.add_argument("--max-shard-seconds", type=float, default=60.0)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s: %(message)s")
    index, count = (int(x) for x in args.shard.split("/"))
    weights = WeightsInfo(args.weights, sha256_file(args.weights), "random init (tests)")
    config = EmbedConfig(
        image_size=args.image_size,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        max_shard_seconds=args.max_shard_seconds,
        log_every=args.log_every,
        shard_index=index,
        shard_count=count,
        device="cpu",
        num_workers=0,
        amp=False,
        progress=False,
    )
    try:
        summary = build_store(
            _SlowFolder(args.images, args.delay), None, args.store, "toy", weights, config
        )
    except EmbedError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    print("SUMMARY", summary.embedded, summary.skipped_existing, len(summary.failed), flush=True)


if __name__ == "__main__":
    main()
