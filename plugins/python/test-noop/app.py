"""The Python twin of the Rust test-noop plugin's `bench:noop` route: a handler that returns at
once, so a benchmark measures what one Python event costs the host (instance, call, drop)."""

from jobhost_listener import Listener, listener  # noqa: F401 (Listener is the export)


@listener.on("bench:noop")
def noop(event):
    pass
