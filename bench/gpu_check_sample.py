"""pytest plugin of ``bench/gpu_check.py --rehearse``: keep a deterministic sample of the collected tests.

``-p gpu_check_sample --sample-every=N`` keeps every N-th collected test (the first, the (N+1)-th, ...) and
deselects the rest, so a CPU rehearsal runs the same files as the GPU check in a fraction of the time. Without
``--sample-every`` (or with 1) nothing is deselected.
"""


def pytest_addoption(parser):
    parser.addoption("--sample-every", type=int, default=1, help="keep every N-th collected test (rehearsal)")


def pytest_collection_modifyitems(config, items):
    every = config.getoption("--sample-every")
    if every <= 1:
        return
    keep = items[::every]
    dropped = [item for i, item in enumerate(items) if i % every]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
