#!/usr/bin/env python3
"""A small email verification service for trying the enrich-emails plugin.

POST /verify with {"emails": [...]} answers {"flagged": [{"email", "reason"}, ...]}: addresses
at disposable-mail domains, role accounts (admin@, noreply@, ...) and addresses without a dot
in their domain. Listens on 127.0.0.1 (port 8787, or the first argument; 0 picks a free one)
and prints "listening on PORT" once it is ready.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DISPOSABLE = {"mailinator.com", "guerrillamail.com", "10minutemail.com", "trashmail.com", "example.invalid"}
ROLES = {"admin", "noreply", "no-reply", "info", "postmaster", "root", "support"}


def reason(email):
    local, _, domain = email.partition("@")
    domain = domain.lower()
    if domain in DISPOSABLE:
        return "disposable domain"
    if local.lower() in ROLES:
        return "role account"
    if "." not in domain:
        return "domain without a dot"
    return None


class Server(ThreadingHTTPServer):
    # Room for a burst of connections (one per part, many parts at once); the default is 5.
    request_queue_size = 128


class Verify(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path != "/verify":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        flagged = [{"email": e, "reason": r} for e in body.get("emails", []) if (r := reason(e))]
        answer = json.dumps({"flagged": flagged}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = Server(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 8787), Verify)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()
