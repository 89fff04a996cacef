"""
Configuration, nanoGPT style. A stage script sets its defaults as plain globals, then runs

    exec(open('configurator.py').read())

which reads sys.argv: an argument without '=' is a config file (plain Python assignments) to execute,
`--key=value` overrides one default. Values are parsed with ast.literal_eval (a bare word stays a string),
must have the default's type (an int may stand for a float, None may be replaced by anything), and
unknown keys are refused with the list of known ones. Names in UPPER_CASE are the script's constants, not
config keys. `--resume` alone means `--resume=True`.
"""
import ast as _ast
import os as _os
import sys as _sys


def _config_error(msg):
    _sys.exit(f"error: {msg}")


def _check(_key, _value, _where):
    if _key not in globals() or _key.startswith("_") or _key.isupper():
        _known = sorted(k for k, v in globals().items() if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str, list, tuple, dict, type(None))) and not callable(v))
        _config_error(f"{_where}: unknown config key {_key!r}; known keys: {', '.join(_known)}")
    _default = globals()[_key]
    if _default is None or _value is None:
        return _value
    if isinstance(_default, float) and isinstance(_value, int) and not isinstance(_value, bool):
        return float(_value)
    if isinstance(_default, (list, tuple)) and isinstance(_value, int) and not isinstance(_value, bool):
        return _value  # e.g. image_layer may be one layer or a list of layers
    if isinstance(_default, int) and not isinstance(_default, bool) and isinstance(_value, (list, tuple)):
        return _value
    if type(_value) is not type(_default):
        _config_error(f"{_where}: {_key}={_value!r} has type {type(_value).__name__}, expected {type(_default).__name__} like the default {_default!r}")
    return _value


for _arg in _sys.argv[1:]:
    if not _arg.startswith("--"):
        if not _os.path.isfile(_arg):
            _config_error(f"{_arg}: config file not found")
        print(f"config: {_arg}")
        _before = {k: v for k, v in globals().items()}
        _ns = {}
        exec(open(_arg).read(), {}, _ns)
        for _key, _value in _ns.items():
            if not _key.startswith("_") and not callable(_value) and not isinstance(_value, type(_sys)):
                globals()[_key] = _check(_key, _value, _arg)
    else:
        _key, _eq, _raw = _arg[2:].partition("=")
        _key = _key.replace("-", "_")
        if not _eq:
            _raw = "True"
        try:
            _value = _ast.literal_eval(_raw)
        except (SyntaxError, ValueError):
            _value = _raw
        globals()[_key] = _check(_key, _value, f"--{_key}")
        print(f"config: {_key} = {globals()[_key]!r}")
