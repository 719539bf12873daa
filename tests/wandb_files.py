"""Reading W&B offline run files in tests."""

import time


def wait_for_bytes(read, needles, timeout=60.0):
    """read() until every needle is in it or `timeout` seconds pass; returns the last read.

    wandb's service process can still be appending to the offline .wandb file after
    wandb.finish() returns when the machine is loaded."""
    end = time.time() + timeout
    while True:
        data = read()
        if all(n in data for n in needles) or time.time() > end:
            return data
        time.sleep(0.5)
