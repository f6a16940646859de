/* jobhost listeners in C: a thin layer over the bindings `jobhost plugin build` generates from
 * the WIT contract (plugin.h), built with clang for wasm32-wasi and made a component.
 *
 * A plugin defines its routes and handlers and includes this header once:
 *
 *   #include "jobhost.h"
 *
 *   static bool ready(const jh_event *event, jh_error *err) { ... return true; }
 *
 *   const jh_route JH_ROUTES[] = {
 *       {"job:ready", "{\"job\":\"space:hello\"}", ready},
 *   };
 *   const size_t JH_ROUTE_COUNT = sizeof JH_ROUTES / sizeof JH_ROUTES[0];
 *
 * A handler returns true, or false with a message set by jh_fail (the delivery fails and is
 * retried). Host calls return false and fill a jobhost error when the host refuses them;
 * jh_host_failed turns that into the handler's failure. Every instance serves one event and
 * is then dropped, so a handler may leave what it allocated for the host to discard.
 */
#ifndef JOBHOST_H
#define JOBHOST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

typedef exports_jobhost_plugin_listener_event_t jh_event;
typedef plugin_string_t jh_error;
typedef jobhost_plugin_types_error_t jh_host_error;

typedef struct {
    const char *topic;
    /* A JSON object (`{"job":"sheet:x","isPart":true}`), or NULL. */
    const char *filter;
    bool (*handler)(const jh_event *event, jh_error *err);
} jh_route;

extern const jh_route JH_ROUTES[];
extern const size_t JH_ROUTE_COUNT;

/* A string the host reads (not copied; `s` must outlive the call). */
static inline plugin_string_t jh_str(const char *s) {
    plugin_string_t out = {(uint8_t *)s, strlen(s)};
    return out;
}

/* A NUL-terminated copy of a host string. */
static inline char *jh_cstr(const plugin_string_t *s) {
    char *out = malloc(s->len + 1);
    memcpy(out, s->ptr, s->len);
    out[s->len] = 0;
    return out;
}

static inline bool jh_str_eq(const plugin_string_t *s, const char *c) {
    return s->len == strlen(c) && memcmp(s->ptr, c, s->len) == 0;
}

/* Sets the handler's error message (printf-style) and returns false. */
static inline bool jh_fail(jh_error *err, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    plugin_string_dup(err, buf);
    return false;
}

static inline const char *jh_kind(jobhost_plugin_types_error_kind_t kind) {
    static const char *names[] = {"not-found", "conflict", "invalid", "denied", "limit", "internal"};
    return kind < 6 ? names[kind] : "internal";
}

/* The handler's failure for a refused host call: `kind: message`. */
static inline bool jh_host_failed(jh_error *err, const jh_host_error *e) {
    return jh_fail(err, "%s: %.*s", jh_kind(e->kind), (int)e->message.len, (const char *)e->message.ptr);
}

/* A repeated delivery finds its work done: a conflict on a job that already ended. */
static inline bool jh_already_ended(const jh_host_error *e) {
    return e->kind == JOBHOST_PLUGIN_TYPES_ERROR_KIND_CONFLICT && e->job_status.is_some &&
           e->job_status.val >= JOBHOST_PLUGIN_TYPES_JOB_STATUS_COMPLETE;
}

/* Completes (`ok`) or fails job `id` with a JSON `outcome` and an optional `info` line,
 * tolerating a job that already ended (a repeated delivery finds its work done). */
static inline bool jh_end_job(bool ok, plugin_string_t *id, const char *outcome, const char *info, jh_error *err) {
    jobhost_plugin_jobs_job_t job;
    jh_host_error e;
    plugin_string_t o = jh_str(outcome), i = jh_str(info ? info : "");
    bool done = ok ? jobhost_plugin_jobs_complete(id, &o, info ? &i : NULL, &job, &e)
                   : jobhost_plugin_jobs_fail(id, &o, info ? &i : NULL, &job, &e);
    return done || jh_already_ended(&e) || jh_host_failed(err, &e);
}

/* The integer after `"key":` in a flat JSON object, or `fallback`. Enough for the small
 * objects jobhost hands a listener (partData, parts counts); use a JSON library for more. */
static inline long long jh_json_int(const char *json, size_t len, const char *key, long long fallback) {
    char pattern[128];
    snprintf(pattern, sizeof pattern, "\"%s\"", key);
    size_t plen = strlen(pattern);
    for (size_t i = 0; i + plen <= len; i++) {
        if (memcmp(json + i, pattern, plen) != 0) continue;
        size_t j = i + plen;
        while (j < len && (json[j] == ' ' || json[j] == ':')) j++;
        if (j < len && (json[j] == '-' || (json[j] >= '0' && json[j] <= '9'))) return strtoll(json + j, NULL, 10);
    }
    return fallback;
}

/* The counts a `job:parts-completed` event carries in its payload's `parts`. */
typedef struct {
    long long total, completed, failed, canceled;
} jh_parts;

static inline jh_parts jh_parts_of(const jh_event *event) {
    const char *p = (const char *)event->payload.ptr;
    size_t n = event->payload.len;
    jh_parts parts = {jh_json_int(p, n, "total", 0), jh_json_int(p, n, "completed", 0),
                      jh_json_int(p, n, "failed", 0), jh_json_int(p, n, "canceled", 0)};
    return parts;
}

static inline void jh_log(jobhost_plugin_log_level_t level, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    plugin_string_t s = jh_str(buf);
    jobhost_plugin_log_log(level, &s);
}

/* ---- the component's exports ---- */

void exports_jobhost_plugin_listener_subscriptions(exports_jobhost_plugin_listener_list_subscription_t *ret) {
    ret->len = JH_ROUTE_COUNT;
    ret->ptr = calloc(JH_ROUTE_COUNT, sizeof *ret->ptr);
    for (size_t i = 0; i < JH_ROUTE_COUNT; i++) {
        plugin_string_dup(&ret->ptr[i].topic, JH_ROUTES[i].topic);
        ret->ptr[i].filter.is_some = JH_ROUTES[i].filter != NULL;
        if (JH_ROUTES[i].filter) plugin_string_dup(&ret->ptr[i].filter.val, JH_ROUTES[i].filter);
    }
}

bool exports_jobhost_plugin_listener_handle(uint32_t route, jh_event *event, plugin_string_t *err) {
    if (route >= JH_ROUTE_COUNT) return jh_fail(err, "no route %u", route);
    return JH_ROUTES[route].handler(event, err);
}

#endif
