/* The C twin of the Rust test-noop plugin's `bench:noop` route: a handler that returns at once,
 * so a benchmark measures what one C event costs the host. */
#include "jobhost.h"

static bool noop(const jh_event *event, jh_error *err) {
    return true;
}

const jh_route JH_ROUTES[] = {
    {"bench:noop", NULL, noop},
};
const size_t JH_ROUTE_COUNT = sizeof JH_ROUTES / sizeof JH_ROUTES[0];
