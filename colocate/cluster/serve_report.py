"""What `colocate serve` prints once a deployment is ready: every service's endpoints,
the metrics targets, a local demo's generated tokens and requests to try."""
from __future__ import annotations

from typing import Mapping, TextIO


def print_endpoints(endpoints: list, generated: Mapping[str, str],
                    out: TextIO, metrics_urls: Mapping[str, str] | None = None,
                    targets: Mapping[str, str] | None = None) -> None:
    """targets: service -> its one target (see Deployment.targets); printed for the
    services with several replicas."""
    width = max(len(e.service) for e in endpoints)
    print("\nready:", file=out)
    for e in endpoints:
        http = f"  {e.http_url}" if e.http_url else ""
        print(f"  {e.service:<{width}}  {e.target}{http}  ({e.entry or e.device}; tokens in "
              f"{', '.join('$' + v for v in e.token_envs)})", file=out)
    replicated = {name: t for name, t in (targets or {}).items()
                  if sum(e.service == name for e in endpoints) > 1}
    if replicated:
        print("\nreplicated services (one target, balanced round-robin by the client):",
              file=out)
        for name, target in replicated.items():
            print(f"  {name:<{width}}  {target}", file=out)
    if metrics_urls:
        print("\nmetrics (one Prometheus target per device):", file=out)
        for device, url in metrics_urls.items():
            print(f"  {device}  {url}", file=out)
    if generated:
        # Printing a secret is acceptable only here: a local demo whose tokens were
        # made up for this run, and die with it.
        print("\nlocal demo: these tenant tokens were generated for this run only:", file=out)
        for var, token in generated.items():
            print(f"  export {var}={token}", file=out)
    first = endpoints[0]
    target = (targets or {}).get(first.service, first.target)
    print(f"\ntry:\n  colocate generate --target {target} "
          f"--token \"${first.token_envs[0]}\" \"Hello\"", file=out, flush=True)
    if first.http_url:
        print(f"  curl {first.http_url}/chat/completions -H \"Authorization: Bearer "
              f"${first.token_envs[0]}\" -H 'Content-Type: application/json' -d "
              f"'{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
              file=out, flush=True)
    print(file=out, flush=True)
