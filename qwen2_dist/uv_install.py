"""Install packages into this Python's environment with uv, from where and under what this Python's pip would.

launch/install.sh runs it by its path, before the package is installed (-I keeps this directory off sys.path), for
the project's dependencies: uv downloads and unpacks them in parallel (on a 2-core machine on 2026-12-07: 14 s for
the ~130 packages of `-e .[dev]`, pip 50 s). pip's configuration (its files and PIP_* variables, taken as `pip
install` itself takes them) is carried over: index-url, extra-index-url (with pip's rule of the best version from
any index), no-index, find-links, constraint, cert and timeout. uv's own configuration is not read (`--no-config`, and
no UV_* variable but those of KEPT_UV_VARIABLES, each dropped one named in a note): a UV_PRERELEASE or a uv.toml
would otherwise have uv install what pip would not. A setting with no counterpart here (trusted-host, client-cert,
proxy, ...) installs nothing and exits 3, as does a uv that cannot be had: install.sh then installs with pip.

usage: python -I qwen2_dist/uv_install.py ARGS...   the arguments of `uv pip install` (-c FILE, -e PATH, --quiet, ...)
  UV   the path of the uv to run (default: the one beside this Python, which its pip installs when missing)
"""

import math
import os
import subprocess
import sys

UV = "uv>=0.5"
# pip settings that change nothing uv is asked to do here (pip's output, cache, prompts and version check).
IGNORED = {"cache-dir", "disable-pip-version-check", "no-input", "progress-bar", "quiet", "retries", "root-user-action",
           "verbose"}


# uv's variables that change where it keeps its cache, how it links and how it shows progress, not what it installs.
KEPT_UV_VARIABLES = {"UV_CACHE_DIR", "UV_NO_CACHE", "UV_LINK_MODE", "UV_NO_PROGRESS", "UV_CONCURRENT_DOWNLOADS",
                     "UV_CONCURRENT_BUILDS", "UV_CONCURRENT_INSTALLS", "UV_COMPILE_BYTECODE_TIMEOUT", "UV_HTTP_TIMEOUT"}


class NotForUv(Exception):
    """pip is configured in a way this translation does not carry over to uv."""


def pip_settings() -> dict[str, object]:
    """The options of `pip install` (by their long names) that pip's configuration sets to other than their defaults,
    as pip takes them (the install section over the global one, PIP_* variables over both). pip's internals: any
    failure there is NotForUv."""
    try:
        from pip._internal.commands import create_command

        command = create_command("install")
        configured, _ = command.parse_args([])
        parser = command.parser
        options = parser.option_list + [o for group in parser.option_groups for o in group.option_list]
    except Exception as e:  # another pip than the ones this was written against (25, 26)
        raise NotForUv(f"could not read pip's configuration ({type(e).__name__}: {e})") from e
    names = {}
    for option in options:
        if option.dest is not None:
            names.setdefault(option.dest, option.get_opt_string().lstrip("-"))
    return {names[dest]: value for dest, value in vars(configured).items()
            if dest in names and value != parser.defaults.get(dest)}


def uv_options(settings: dict[str, object]) -> tuple[list[str], dict[str, str]]:
    """The `uv pip install` arguments and environment that stand for pip's settings; NotForUv when one has none."""
    args, env = [], {}
    for name, value in settings.items():
        if name == "index-url":
            args += ["--index-url", value]
        elif name == "extra-index-url":
            args += [arg for url in value for arg in ("--extra-index-url", url)]
            args += ["--index-strategy", "unsafe-best-match"]  # pip's: the best version of any index
        elif name == "no-index":
            args += ["--no-index"] if value else []
        elif name == "find-links":
            args += [arg for location in value for arg in ("--find-links", location)]
        elif name == "constraint":
            args += [arg for path in value for arg in ("--constraint", path)]
        elif name == "cert":
            env["SSL_CERT_FILE"] = value
        elif name == "timeout":
            env["UV_HTTP_TIMEOUT"] = str(max(1, math.ceil(value)))  # whole seconds: 0.5 would be 0, no time
        elif name not in IGNORED:
            raise NotForUv(f"pip's setting {name}={value!r} is not carried over to uv")
    return args, env


def find_uv() -> str:
    """$UV; else the uv beside this Python, installed there by its pip when missing; NotForUv when there is none."""
    uv = os.environ.get("UV") or os.path.join(os.path.dirname(sys.executable), "uv")
    if not (os.path.isfile(uv) and os.access(uv, os.X_OK)):
        if "UV" in os.environ:
            raise NotForUv(f"UV={uv}: not an executable")
        installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", UV])
        if installed.returncode != 0 or not (os.path.isfile(uv) and os.access(uv, os.X_OK)):
            raise NotForUv(f"could not install {UV} with pip")
    return uv


def main(argv: list[str]) -> int:
    try:
        args, env = uv_options(pip_settings())
        uv = find_uv()
    except NotForUv as e:
        print(f"note: not installing with uv: {e}", file=sys.stderr)
        return 3
    dropped = sorted(k for k in os.environ if k.startswith("UV_") and k not in KEPT_UV_VARIABLES and k not in env)
    if dropped:
        print(f"note: uv installs as pip is configured, without {', '.join(dropped)}", file=sys.stderr)
    child_env = {k: v for k, v in os.environ.items() if k not in dropped}
    command = [uv, "pip", "install", "--no-config", "--python", sys.executable, *args, *argv]
    return subprocess.run(command, env={**child_env, **env}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
