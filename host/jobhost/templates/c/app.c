/* The `{{name}}` listener: checks a sheet in parts.
 *
 * - The parent job (`sheet:{{name}}`) is split into one part per PART_SIZE records.
 * - Each part reads its page, checks every record with `check`, writes an error message on the
 *   records that break the rule, and completes.
 * - When every part has ended the host emits `job:parts-completed`; the parent completes with
 *   the counts, or fails when a part failed.
 *
 * Delivery is at least once: jh_already_ended and jh_end_job skip work a repeated event finds
 * done. Every instance serves one event and is then dropped, so nothing allocated here is freed.
 */
#include "jobhost.h"

#define JOB "sheet:{{name}}"
/* Records per part (the sample's 24 records make 3 parts; raise it for real sheets). */
#define PART_SIZE 10
/* The rule: every email contains this. */
#define REQUIRED "@"

/* The message for one record's email, or NULL when it is valid. */
static const char *check(const jobhost_plugin_types_value_t *email) {
    if (email != NULL && email->tag == JOBHOST_PLUGIN_TYPES_VALUE_TEXT && strstr(jh_cstr(&email->val.text), REQUIRED))
        return NULL;
    return "email must contain " REQUIRED;
}

/* ack the job; *ended is set when it already ended (a repeated delivery) */
static bool ack(plugin_string_t *id, const char *info, jobhost_plugin_jobs_job_t *job, bool *ended, jh_error *err) {
    jh_host_error e;
    plugin_string_t i = jh_str(info);
    uint8_t progress = 10;
    if (jobhost_plugin_jobs_ack(id, &i, &progress, NULL, job, &e)) return true;
    *ended = jh_already_ended(&e);
    return *ended || jh_host_failed(err, &e);
}

static bool split(const jh_event *event, jh_error *err) {
    plugin_string_t id = event->job_id.val, sheet = event->sheet_id.val;
    jobhost_plugin_records_record_counts_t counts;
    jobhost_plugin_jobs_job_t job;
    jh_host_error e;
    bool ended = false;
    if (!jobhost_plugin_records_counts(&sheet, &counts, &e)) return jh_host_failed(err, &e);
    if (!ack(&id, "splitting", &job, &ended, err)) return false;
    if (ended) return true;
    if (counts.total == 0) return jh_end_job(true, &id, "{\"message\":\"the sheet has no records\"}", NULL, err);
    uint32_t parts = (uint32_t)((counts.total + PART_SIZE - 1) / PART_SIZE), made;
    jobhost_plugin_jobs_split_parts_t how = {.tag = JOBHOST_PLUGIN_JOBS_SPLIT_PARTS_COUNT, .val.count = parts};
    if (!jobhost_plugin_jobs_split(&id, &how, true, &made, &e) && !strstr(jh_cstr(&e.message), "already split"))
        return jh_host_failed(err, &e);
    return true;
}

static bool check_part(const jh_event *event, jh_error *err) {
    plugin_string_t id = event->job_id.val, sheet = event->sheet_id.val;
    jobhost_plugin_jobs_job_t job;
    jh_host_error e;
    bool ended = false;
    if (!ack(&id, "checking", &job, &ended, err)) return false;
    if (ended) return true;
    long long part = job.part_data.is_some
                         ? jh_json_int((const char *)job.part_data.val.ptr, job.part_data.val.len, "part", -1)
                         : -1;
    if (part < 0) return jh_fail(err, "the part has no partData.part");
    jobhost_plugin_records_record_page_t page;
    if (!jobhost_plugin_records_page(&sheet, PART_SIZE, (uint32_t)part + 1, &page, &e)) return jh_host_failed(err, &e);
    int email = -1;
    for (size_t f = 0; f < page.fields.len; f++)
        if (jh_str_eq(&page.fields.ptr[f], "email")) email = (int)f;
    jobhost_plugin_types_record_update_t *updates = calloc(page.rows.len + 1, sizeof *updates);
    size_t invalid = 0;
    for (size_t r = 0; r < page.rows.len; r++) {
        jobhost_plugin_types_row_t *row = &page.rows.ptr[r];
        const char *message = check(email >= 0 ? &row->values.ptr[email] : NULL);
        if (message == NULL) continue;
        jobhost_plugin_types_record_update_t *u = &updates[invalid++];
        u->id = row->id;
        u->messages.is_some = true;
        u->messages.val.len = 1;
        u->messages.val.ptr = calloc(1, sizeof *u->messages.val.ptr);
        u->messages.val.ptr[0].field = (plugin_option_string_t){true, jh_str("email")};
        u->messages.val.ptr[0].kind = JOBHOST_PLUGIN_TYPES_MESSAGE_KIND_ERROR;
        u->messages.val.ptr[0].text = jh_str(message);
    }
    if (invalid > 0) {
        jobhost_plugin_records_list_record_update_t list = {updates, invalid};
        uint64_t changed;
        if (!jobhost_plugin_records_update(&sheet, &list, &changed, &e)) return jh_host_failed(err, &e);
    }
    char outcome[128];
    snprintf(outcome, sizeof outcome, "{\"checked\":%zu,\"invalid\":%zu}", page.rows.len, invalid);
    return jh_end_job(true, &id, outcome, NULL, err);
}

static bool finish(const jh_event *event, jh_error *err) {
    plugin_string_t id = event->job_id.val, sheet = event->sheet_id.val;
    jh_parts parts = jh_parts_of(event);
    long long total = parts.total, completed = parts.completed, failed = parts.failed, canceled = parts.canceled;
    jobhost_plugin_records_record_counts_t c;
    jh_host_error e;
    if (!jobhost_plugin_records_counts(&sheet, &c, &e)) return jh_host_failed(err, &e);
    char outcome[512];
    snprintf(outcome, sizeof outcome,
             "{\"message\":\"%llu records, %llu invalid\","
             "\"parts\":{\"total\":%lld,\"completed\":%lld,\"failed\":%lld,\"canceled\":%lld},"
             "\"records\":{\"total\":%llu,\"valid\":%llu,\"error\":%llu}}",
             (unsigned long long)c.total, (unsigned long long)c.error, total, completed, failed, canceled,
             (unsigned long long)c.total, (unsigned long long)c.valid, (unsigned long long)c.error);
    return jh_end_job(failed + canceled == 0, &id, outcome, NULL, err);
}

const jh_route JH_ROUTES[] = {
    {"job:ready", "{\"job\":\"" JOB "\",\"isPart\":false}", split},
    {"job:parts-completed", "{\"job\":\"" JOB "\",\"isPart\":false}", finish},
    {"job:ready", "{\"job\":\"" JOB "\",\"isPart\":true}", check_part},
};
const size_t JH_ROUTE_COUNT = sizeof JH_ROUTES / sizeof JH_ROUTES[0];
