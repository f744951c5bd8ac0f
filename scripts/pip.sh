# Sourced by the setup scripts: `pip_install ARGS...` is `python -m pip install ARGS...` made to survive a flaky
# network. A download cut off mid-wheel (triton and torch are hundreds of MB) is resumed, and an install that still
# fails is tried again after a pause, from pip's cache where the wheel did arrive.
export PIP_RETRIES=${PIP_RETRIES:-10}
export PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-20}  # pip >= 25.1; older pips ignore the variable
pip_install() {
  local try
  for try in 1 2 3 4; do
    if python -m pip install "$@"; then
      return 0
    fi
    if [ "$try" -lt 4 ]; then
      echo "pip install $* failed (try $try of 4); trying again in $((try * 20)) s" >&2
      sleep $((try * 20))
    fi
  done
  echo "pip install $* failed 4 times" >&2
  return 1
}
