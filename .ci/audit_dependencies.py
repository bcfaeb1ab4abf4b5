"""pip-audit over the packages installed in the virtualenv, judged: `make security` runs it.

Exits 1 when a package has a known vulnerability (other than the documented exceptions
below) or when only some packages could be audited. When no package at all could be
audited, the vulnerability service is out of reach from this machine: it says so loudly
and exits 0, unless PIP_AUDIT_REQUIRED=1 (set it on runners that can reach
https://pypi.org/pypi/<name>/<version>/json or https://api.osv.dev).

Where pip-audit audits nothing, PyPI's project documents (/pypi/<name>/json, which these
registries do answer) still list the known vulnerabilities of each project's latest release:
every package installed at its latest release is audited from them, a vulnerability found
fails, and the packages older than their latest release are listed as not audited (they fail
only with PIP_AUDIT_REQUIRED=1).

Why not fail there too: the machines this project is built on reach only package
registries. pip-audit's default service asks PyPI for each installed version
(/pypi/<name>/<version>/json); the registry these machines reach answers only the
project-level document (/pypi/<name>/json) and 404s every version URL, so pip-audit skips
every package, prints "No known vulnerabilities found" and exits 0: a pass that audited
nothing. OSV (the other service) does not resolve. Failing would fail every CI run
there for a reason no commit can fix; passing quietly would hide that nothing was checked.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import os
import subprocess  # nosec B404 # runs pip-audit from this virtualenv, fixed arguments
import sys
import urllib.parse
import urllib.request

# Vulnerability ids accepted after review, each with its reason; passed to --ignore-vuln.
DOCUMENTED_EXCEPTIONS: dict[str, str] = {}
PIP_AUDIT_TIMEOUT_SECONDS = 600
REQUIRED_ENV = "PIP_AUDIT_REQUIRED"
EDITABLE_SKIP_REASON = "distribution marked as editable"
PYPI_PROJECT_URL = "https://pypi.org/pypi/{name}/json"
PYPI_TIMEOUT_SECONDS = 20
PYPI_LOOKUPS_AT_ONCE = 16
# Lines of skip reasons printed when nothing could be audited (they all say the same).
REASONS_SHOWN_MAX = 3


def main() -> int:
    command = [sys.executable, "-m", "pip_audit", "--local", "--skip-editable", "--progress-spinner", "off",
               "--format", "json", "--desc", "off"]
    for vulnerability_id in DOCUMENTED_EXCEPTIONS:
        command += ["--ignore-vuln", vulnerability_id]
    run = subprocess.run(command, capture_output=True, text=True, timeout=PIP_AUDIT_TIMEOUT_SECONDS)  # nosec B603 # fixed argv
    try:
        report = json.loads(run.stdout)
    except ValueError:
        return not_audited([f"pip-audit gave no report (exit {run.returncode}): {run.stderr.strip()[-600:]}"])
    dependencies = [d for d in report["dependencies"] if d.get("skip_reason") != EDITABLE_SKIP_REASON]
    skipped = [f"{d['name']}: {d['skip_reason']}" for d in dependencies if d.get("skip_reason")]
    audited = [d for d in dependencies if not d.get("skip_reason")]
    vulnerable = [(d, v) for d in audited for v in d.get("vulns", [])]
    for dependency, vulnerability in vulnerable:
        fixed = ", ".join(vulnerability.get("fix_versions") or []) or "no fixed version"
        print(f"pip-audit: {dependency['name']} {dependency['version']}: {vulnerability['id']} (fixed in {fixed})")
    if vulnerable:
        print(f"pip-audit: {len(vulnerable)} known vulnerabilities: upgrade, or document each in {__file__}")
        return 1
    if not audited:
        return audit_latest_releases([(d["name"], installed_version(d["name"])) for d in dependencies], skipped)
    if skipped:
        print(f"pip-audit: {len(skipped)} of {len(dependencies)} packages could not be audited:")
        print("\n".join(f"  {line}" for line in skipped))
        return 1
    ignored = f", {len(DOCUMENTED_EXCEPTIONS)} documented exceptions" if DOCUMENTED_EXCEPTIONS else ""
    print(f"pip-audit: {len(audited)} packages audited, no known vulnerabilities{ignored}")
    return 0


def installed_version(name: str) -> str:
    """The version installed in this virtualenv (pip-audit leaves it out of the packages it skips)."""
    return importlib.metadata.version(name)


def latest_release(name: str) -> tuple[str, list[dict]]:
    """PyPI's project document: the latest version and the known vulnerabilities of that version."""
    url = PYPI_PROJECT_URL.format(name=urllib.parse.quote(name))
    with urllib.request.urlopen(url, timeout=PYPI_TIMEOUT_SECONDS) as response:  # nosec B310  # a fixed https URL of PyPI
        document = json.loads(response.read())
    return document["info"]["version"], document.get("vulnerabilities") or []


def audit_latest_releases(installed: list[tuple[str, str]], reasons: list[str]) -> int:
    """When pip-audit could check nothing: PyPI's project document (which this machine's registry
    does answer) lists the known vulnerabilities of a project's latest release. Every package
    installed at its latest release is audited that way; the others are listed as not audited."""
    try:
        with concurrent.futures.ThreadPoolExecutor(PYPI_LOOKUPS_AT_ONCE) as pool:
            latest = dict(zip(installed, pool.map(lambda package: latest_release(package[0]), installed)))
    except (OSError, ValueError, KeyError) as error:
        return not_audited([*reasons, f"PyPI's project documents too: {error}"])
    vulnerable, behind = [], []
    for (name, version), (latest_version, vulnerabilities) in latest.items():
        if version != latest_version:
            behind.append(f"{name} {version} (latest {latest_version})")
            continue
        vulnerable += [(name, version, v) for v in vulnerabilities if v.get("id") not in DOCUMENTED_EXCEPTIONS and not v.get("withdrawn")]
    for name, version, vulnerability in vulnerable:
        print(f"pip-audit: {name} {version}: {vulnerability.get('id')} (fixed in {', '.join(vulnerability.get('fixed_in') or []) or '?'})")
    audited = len(installed) - len(behind)
    print(f"pip-audit: the vulnerability service is out of reach; {audited} of {len(installed)} packages are at their latest "
          "release and were audited from PyPI's project documents")
    if behind:
        print(f"pip-audit: not audited (older than their latest release): {', '.join(behind)}")
    if vulnerable:
        print(f"pip-audit: {len(vulnerable)} known vulnerabilities: upgrade, or document each in {__file__}")
        return 1
    if behind and os.environ.get(REQUIRED_ENV, "") not in ("", "0"):
        print(f"pip-audit: {REQUIRED_ENV}=1, so packages left unaudited fail")
        return 1
    return 0


def not_audited(reasons: list[str]) -> int:
    required = os.environ.get(REQUIRED_ENV, "") not in ("", "0")
    print("pip-audit: NOT AUDITED: no package could be checked; the vulnerability service is out of reach:")
    shown = reasons[:REASONS_SHOWN_MAX] + ([f"... and {len(reasons) - REASONS_SHOWN_MAX} more"] if len(reasons) > REASONS_SHOWN_MAX else [])
    print("\n".join(f"  {line}" for line in shown))
    if required:
        print(f"pip-audit: {REQUIRED_ENV}=1, so this fails")
        return 1
    print(f"pip-audit: skipped (set {REQUIRED_ENV}=1 where PyPI's per-version JSON or OSV is reachable to make this fail)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
