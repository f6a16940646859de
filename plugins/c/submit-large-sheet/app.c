/* The seeds' two listeners in C: the same behaviour and messages as plugins/submit-large-sheet
 * (Rust), plugins/python/… and plugins/js/….
 *
 * Parent ({job: sheet:submitLargeSheet, isPart: false}): on job:ready read the counts, ack,
 * split into ceil(total / 1000) parts; on job:parts-completed complete (or fail, when a part
 * failed or was canceled) with the counts. Part (isPart: true): ack, validate page part + 1 of
 * 1000 records, write error messages back on invalid cells, complete.
 */
#include <ctype.h>
#include <math.h>

#include "jobhost.h"

#define BATCH 1000

static plugin_option_string_t some(const char *s) {
    plugin_option_string_t o = {true, jh_str(s)};
    return o;
}

static const plugin_option_string_t NONE = {false, {NULL, 0}};

/* ---- the parent ---- */

static bool ack(plugin_string_t *id, const char *info, int progress, bool *ended, jobhost_plugin_jobs_job_t *job,
                jh_error *err) {
    jh_host_error e;
    plugin_option_string_t i = info ? some(info) : NONE;
    uint8_t p = (uint8_t)progress;
    if (jobhost_plugin_jobs_ack(id, i.is_some ? &i.val : NULL, progress >= 0 ? &p : NULL, NULL, job, &e)) return true;
    if (jh_already_ended(&e)) {
        *ended = true;
        return true;
    }
    return jh_host_failed(err, &e);
}

static bool parent_ready(const jh_event *event, jh_error *err) {
    plugin_string_t id = event->job_id.val, sheet = event->sheet_id.val;
    jobhost_plugin_jobs_job_t job;
    jh_host_error e;
    if (!jobhost_plugin_jobs_get(&id, &job, &e)) return jh_host_failed(err, &e);
    if (job.status >= JOBHOST_PLUGIN_TYPES_JOB_STATUS_COMPLETE) return true;
    jobhost_plugin_records_record_counts_t counts;
    if (!jobhost_plugin_records_counts(&sheet, &counts, &e)) return jh_host_failed(err, &e);
    bool ended = false;
    if (!ack(&id, "Splitting Job", 10, &ended, &job, err)) return false;
    if (ended) return true;
    if (counts.total == 0)
        return jh_end_job(true, &id, "{\"message\":\"The sheet has no records; nothing to do.\"}", NULL, err);
    uint32_t parts = (uint32_t)((counts.total + BATCH - 1) / BATCH);
    jobhost_plugin_jobs_split_parts_t how = {.tag = JOBHOST_PLUGIN_JOBS_SPLIT_PARTS_COUNT, .val.count = parts};
    uint32_t made;
    if (!jobhost_plugin_jobs_split(&id, &how, true, &made, &e)) {
        char *message = jh_cstr(&e.message);
        bool repeat = strstr(message, "already split") != NULL;
        if (!repeat) return jh_host_failed(err, &e);
    }
    char *job_id = jh_cstr(&id);
    jh_log(JOBHOST_PLUGIN_LOG_LEVEL_INFO, "split %s into %u parts", job_id, parts);
    char info[64];
    snprintf(info, sizeof info, "Job split into %u parts.", parts);
    return ack(&id, info, 20, &ended, &job, err);
}

static bool parts_completed(const jh_event *event, jh_error *err) {
    plugin_string_t id = event->job_id.val, sheet = event->sheet_id.val;
    jh_parts parts = jh_parts_of(event);
    long long total = parts.total, completed = parts.completed, failed = parts.failed, canceled = parts.canceled;
    jobhost_plugin_records_record_counts_t c;
    jh_host_error e;
    if (!jobhost_plugin_records_counts(&sheet, &c, &e)) return jh_host_failed(err, &e);
    char summary[512], outcome[1024];
    snprintf(summary, sizeof summary,
             "%lld of %lld parts completed, %lld failed, %lld canceled; %llu records: %llu valid, %llu invalid.",
             completed, total, failed, canceled, (unsigned long long)c.total, (unsigned long long)c.valid,
             (unsigned long long)c.error);
    snprintf(outcome, sizeof outcome,
             "{\"message\":\"%s\",\"parts\":{\"total\":%lld,\"completed\":%lld,\"failed\":%lld,\"canceled\":%lld},"
             "\"records\":{\"total\":%llu,\"valid\":%llu,\"error\":%llu}}",
             summary, total, completed, failed, canceled, (unsigned long long)c.total, (unsigned long long)c.valid,
             (unsigned long long)c.error);
    return jh_end_job(failed == 0 && canceled == 0, &id, outcome, summary, err);
}

/* ---- the parts ---- */

typedef struct {
    const char *field;
    char text[256];
} wanted_message;

static bool blank(const jobhost_plugin_types_value_t *v) {
    if (v == NULL || v->tag == JOBHOST_PLUGIN_TYPES_VALUE_NULL) return true;
    if (v->tag != JOBHOST_PLUGIN_TYPES_VALUE_TEXT) return false;
    for (size_t i = 0; i < v->val.text.len; i++)
        if (!isspace(v->val.text.ptr[i])) return false;
    return true;
}

static bool valid_email(const char *email) {
    const char *at = strchr(email, '@');
    if (at == NULL || at == email) return false;
    const char *domain = at + 1;
    size_t n = strlen(domain);
    for (const char *c = email; *c; c++)
        if (isspace((unsigned char)*c)) return false;
    return strchr(domain, '@') == NULL && strchr(domain, '.') != NULL && domain[0] != '.' &&
           (n == 0 || domain[n - 1] != '.');
}

/* Rust's `str::trim().parse::<i64>()`: optional sign, then digits only. */
static bool parse_int(const plugin_string_t *s, long long *out) {
    size_t a = 0, b = s->len;
    while (a < b && isspace(s->ptr[a])) a++;
    while (b > a && isspace(s->ptr[b - 1])) b--;
    size_t i = a;
    if (i < b && (s->ptr[i] == '+' || s->ptr[i] == '-')) i++;
    if (i == b) return false;
    for (size_t j = i; j < b; j++)
        if (!isdigit(s->ptr[j])) return false;
    char buf[32];
    if (b - a >= sizeof buf) return false;
    memcpy(buf, s->ptr + a, b - a);
    buf[b - a] = 0;
    *out = strtoll(buf, NULL, 10);
    return true;
}

/* The value as the Rust example shows it in its message. */
static void show(const jobhost_plugin_types_value_t *v, char *out, size_t n) {
    switch (v->tag) {
    case JOBHOST_PLUGIN_TYPES_VALUE_BOOLEAN: snprintf(out, n, "%s", v->val.boolean ? "true" : "false"); break;
    case JOBHOST_PLUGIN_TYPES_VALUE_INTEGER: snprintf(out, n, "%lld", (long long)v->val.integer); break;
    case JOBHOST_PLUGIN_TYPES_VALUE_FLOAT:
        /* the shortest text that reads back as the same number, as Rust prints it */
        for (int p = 1; p <= 17; p++) {
            snprintf(out, n, "%.*g", p, v->val.float_);
            if (strtod(out, NULL) == v->val.float_) break;
        }
        break;
    case JOBHOST_PLUGIN_TYPES_VALUE_TEXT:
        snprintf(out, n, "\"%.*s\"", (int)v->val.text.len, (const char *)v->val.text.ptr);
        break;
    default: snprintf(out, n, "null");
    }
}

static size_t validate(const jobhost_plugin_types_value_t *first, const jobhost_plugin_types_value_t *last,
                       const jobhost_plugin_types_value_t *email, const jobhost_plugin_types_value_t *age,
                       wanted_message *out) {
    size_t n = 0;
    const char *names[] = {"firstName", "lastName", "email"};
    const jobhost_plugin_types_value_t *values[] = {first, last, email};
    for (int i = 0; i < 3; i++) {
        if (blank(values[i])) {
            out[n].field = names[i];
            snprintf(out[n].text, sizeof out[n].text, "%s is required", names[i]);
            n++;
        }
    }
    if (email && email->tag == JOBHOST_PLUGIN_TYPES_VALUE_TEXT && !blank(email)) {
        char *text = jh_cstr(&email->val.text);
        if (!valid_email(text)) {
            out[n].field = "email";
            snprintf(out[n].text, sizeof out[n].text, "`%s` is not an email address (local@domain.tld)", text);
            n++;
        }
    }
    if (age && !blank(age)) {
        long long a = 0;
        bool ok = (age->tag == JOBHOST_PLUGIN_TYPES_VALUE_INTEGER && (a = age->val.integer, true)) ||
                  (age->tag == JOBHOST_PLUGIN_TYPES_VALUE_TEXT && parse_int(&age->val.text, &a));
        if (!ok || a < 0 || a > 150) {
            char shown[200];
            show(age, shown, sizeof shown);
            out[n].field = "age";
            snprintf(out[n].text, sizeof out[n].text, "age must be an integer from 0 to 150, not %s", shown);
            n++;
        }
    }
    return n;
}

/* The record already carries exactly these messages (as sets of field and text). */
static bool same_messages(const jobhost_plugin_types_list_message_t *current, const wanted_message *wanted, size_t n) {
    if (current->len != n) return false;
    bool used[8] = {false};
    for (size_t i = 0; i < current->len; i++) {
        const jobhost_plugin_types_message_t *m = &current->ptr[i];
        bool found = false;
        for (size_t j = 0; j < n && !found; j++) {
            if (used[j] || !m->field.is_some || !jh_str_eq(&m->field.val, wanted[j].field) ||
                !jh_str_eq(&m->text, wanted[j].text))
                continue;
            used[j] = found = true;
        }
        if (!found) return false;
    }
    return true;
}

/* Whether `part` is listed in the parent's input `failParts` (demonstrations and tests). */
static bool fails_on_purpose(const plugin_option_string_t *input, long long part) {
    if (!input->is_some) return false;
    char *text = jh_cstr(&input->val);
    char *list = strstr(text, "\"failParts\"");
    if (list == NULL || (list = strchr(list, '[')) == NULL) return false;
    for (char *p = list + 1; *p && *p != ']';) {
        char *next;
        long long v = strtoll(p, &next, 10);
        if (next == p) {
            p++;
            continue;
        }
        if (v == part) return true;
        p = next;
    }
    return false;
}

static bool part_ready(const jh_event *event, jh_error *err) {
    plugin_string_t id = event->job_id.val, sheet = event->sheet_id.val;
    jobhost_plugin_jobs_job_t job;
    jh_host_error e;
    bool ended = false;
    if (!ack(&id, NULL, -1, &ended, &job, err)) return false;
    if (ended) return true;
    if (!job.part_data.is_some) return jh_fail(err, "the part has no partData.part");
    long long part = jh_json_int((const char *)job.part_data.val.ptr, job.part_data.val.len, "part", -1);
    if (part < 0) return jh_fail(err, "the part has no partData.part");
    if (job.parent_id.is_some) {
        jobhost_plugin_jobs_job_t parent;
        if (!jobhost_plugin_jobs_get(&job.parent_id.val, &parent, &e)) return jh_host_failed(err, &e);
        if (fails_on_purpose(&parent.input, part)) {
            char outcome[128];
            snprintf(outcome, sizeof outcome, "{\"message\":\"part %lld failed on purpose\"}", part);
            return jh_end_job(false, &id, outcome, NULL, err);
        }
    }
    jobhost_plugin_records_record_page_t page;
    if (!jobhost_plugin_records_page(&sheet, BATCH, (uint32_t)part + 1, &page, &e)) return jh_host_failed(err, &e);
    int col[4] = {-1, -1, -1, -1};
    const char *names[] = {"firstName", "lastName", "email", "age"};
    for (size_t f = 0; f < page.fields.len; f++)
        for (int k = 0; k < 4; k++)
            if (jh_str_eq(&page.fields.ptr[f], names[k])) col[k] = (int)f;
    jobhost_plugin_types_record_update_t *updates = calloc(page.rows.len ? page.rows.len : 1, sizeof *updates);
    size_t n_updates = 0, invalid = 0;
    for (size_t r = 0; r < page.rows.len; r++) {
        jobhost_plugin_types_row_t *row = &page.rows.ptr[r];
        const jobhost_plugin_types_value_t *v[4];
        for (int k = 0; k < 4; k++) v[k] = col[k] >= 0 ? &row->values.ptr[col[k]] : NULL;
        wanted_message *wanted = calloc(8, sizeof *wanted);
        size_t n = validate(v[0], v[1], v[2], v[3], wanted);
        invalid += n > 0;
        if (same_messages(&row->messages, wanted, n)) continue;
        jobhost_plugin_types_record_update_t *u = &updates[n_updates++];
        u->id = row->id;
        u->messages.is_some = true;
        u->messages.val.len = n;
        u->messages.val.ptr = calloc(n ? n : 1, sizeof *u->messages.val.ptr);
        for (size_t i = 0; i < n; i++) {
            jobhost_plugin_types_message_t *m = &u->messages.val.ptr[i];
            m->field = some(wanted[i].field);
            m->kind = JOBHOST_PLUGIN_TYPES_MESSAGE_KIND_ERROR;
            m->text = jh_str(wanted[i].text);
        }
    }
    if (n_updates > 0) {
        jobhost_plugin_records_list_record_update_t list = {updates, n_updates};
        uint64_t changed;
        if (!jobhost_plugin_records_update(&sheet, &list, &changed, &e)) return jh_host_failed(err, &e);
    }
    char message[128], outcome[256];
    snprintf(message, sizeof message, "validated %zu records, %zu invalid", page.rows.len, invalid);
    snprintf(outcome, sizeof outcome, "{\"message\":\"%s\",\"invalid\":%zu}", message, invalid);
    return jh_end_job(true, &id, outcome, message, err);
}

const jh_route JH_ROUTES[] = {
    {"job:ready", "{\"job\":\"sheet:submitLargeSheet\",\"isPart\":false}", parent_ready},
    {"job:parts-completed", "{\"job\":\"sheet:submitLargeSheet\",\"isPart\":false}", parts_completed},
    {"job:ready", "{\"job\":\"sheet:submitLargeSheet\",\"isPart\":true}", part_ready},
};
const size_t JH_ROUTE_COUNT = sizeof JH_ROUTES / sizeof JH_ROUTES[0];
