"""Reads a run's TensorBoard event files with the real `tensorboard` package's event reader (EventAccumulator) and
prints every scalar series as JSON: {"tag": [[step, value], ...], ...}. Used by tests/cli_ux.rs (scripts/test.sh
installs `tensorboard` into target/tb-venv); run by hand: target/tb-venv/bin/python scripts/tensorboard_readback.py
runs/default/tensorboard"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
    acc.Reload()
    out = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
