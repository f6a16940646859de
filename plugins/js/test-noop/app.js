// The JavaScript twin of the Rust test-noop plugin's `bench:noop` route: a handler that returns
// at once, so a benchmark measures what one JavaScript event costs the host.

export default function (listener) {
  listener.on("bench:noop", () => {});
}
