# Sourced by the setup scripts: `pip_install ARGS...` is `python -m pip install ARGS...` made to survive a flaky
# network. A download cut off mid-wheel (triton and torch are hundreds of MB) is resumed, and an install that still
# fails is tried again after a pause. `pip_prefetch SPEC` installs SPEC's wheel from a wheelhouse shared by every
# environment, so that a wheel several environments need is downloaded once: pip's own HTTP cache is off where the
# index answers `no-store`, and a network that cuts long downloads then costs one download per environment.
export PIP_RETRIES=${PIP_RETRIES:-10}
export PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-20}  # pip >= 25.1; older pips ignore the variable
WHEELHOUSE=${VLMKV_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlmkv/wheels}

_pip_retry() {  # _pip_retry ARGS...: `python -m pip ARGS...`, 4 tries with 20/40/60 s pauses
  local try
  for try in 1 2 3 4; do
    if python -m pip "$@"; then
      return 0
    fi
    if [ "$try" -lt 4 ]; then
      echo "pip $* failed (try $try of 4); trying again in $((try * 20)) s" >&2
      sleep $((try * 20))
    fi
  done
  echo "pip $* failed 4 times" >&2
  return 1
}

pip_install() {
  _pip_retry install "$@"
}

pip_prefetch() {  # pip_prefetch SPEC: SPEC's wheel (no dependencies) into the wheelhouse, then installed from there
  local log wheel
  mkdir -p -m 700 "$WHEELHOUSE"  # the user's own: nothing installs from a folder others can write
  # `pip download` checks a wheel already there against the index's sha256 and downloads it again if it differs
  log=$(_pip_retry download --no-deps --only-binary=:all: -d "$WHEELHOUSE" "$1") || return 1
  wheel=$(printf '%s\n' "$log" | sed -nE 's/^ *(Saved|File was already downloaded) (.*\.whl)$/\2/p' | tail -n 1)
  if [ -z "$wheel" ] || [ ! -f "$wheel" ]; then
    echo "pip_prefetch $1: no wheel named in pip's output; it installs from the index instead" >&2
    return 0
  fi
  _pip_retry install -q --no-deps "$wheel"
}
