/* A C listener whose handlers fail: with a message of their own, with a host refusal they do
 * not handle, and by trapping. Each must fail only its delivery, with what happened. */
#include "jobhost.h"

static bool explode(const jh_event *event, jh_error *err) {
    jh_log(JOBHOST_PLUGIN_LOG_LEVEL_INFO, "failing now");
    return jh_fail(err, "bad input in row %d", 7);
}

static bool refused(const jh_event *event, jh_error *err) {
    plugin_string_t other = jh_str("job_of_someone_else");
    jobhost_plugin_jobs_job_t job;
    jh_host_error e;
    if (!jobhost_plugin_jobs_complete(&other, NULL, NULL, &job, &e)) return jh_host_failed(err, &e);
    return true;
}

static bool trap(const jh_event *event, jh_error *err) {
    abort();
}

const jh_route JH_ROUTES[] = {
    {"job:ready", "{\"job\":\"space:explode\"}", explode},
    {"job:ready", "{\"job\":\"space:refused\"}", refused},
    {"job:ready", "{\"job\":\"space:trap\"}", trap},
};
const size_t JH_ROUTE_COUNT = sizeof JH_ROUTES / sizeof JH_ROUTES[0];
