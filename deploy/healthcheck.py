"""Container health check: GET /healthz (or /readyz) on the daemon's metrics endpoint.

The host and port come from the same settings as the daemon (the ``--config`` file and the
``STREAMLSTM_...`` environment), so the check follows ``metrics.port`` wherever it is set.
Exit 0 when the endpoint answers 200, 1 otherwise. Needs no curl: the image is slim.

    python3 /opt/streamlstm/healthcheck.py --config /etc/streamlstm/streamlstm.toml
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def endpoint_url(config: str | None, path: str) -> str | None:
    """URL of ``path`` on the metrics endpoint, or None when the endpoint is disabled."""
    from streamlstm.config import load_settings

    config_file = config if config and os.path.exists(config) else None
    metrics = load_settings(config_file).metrics
    if not metrics.enabled:
        return None
    host = metrics.host
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{metrics.port}{path}"


def main(argv: list[str] | None = None) -> int:
    """Probe the endpoint once; the exit status is the verdict."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="the daemon's settings file (skipped if missing)")
    parser.add_argument("--path", default="/healthz", choices=["/healthz", "/readyz"])
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        url = endpoint_url(args.config, args.path)
    except Exception as exc:  # a bad setting: the daemon cannot be healthy either
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if url is None:
        print("metrics.enabled is false: no endpoint to probe")
        return 0
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{'ok' if ok else 'unhealthy'}: {url}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
