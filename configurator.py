"""
Configuration, nanoGPT style. A stage script sets its defaults as plain globals, then runs

    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

which reads sys.argv: an argument without '=' is a config file (plain Python assignments) to execute,
`--key=value` overrides one default. Values are parsed with ast.literal_eval (a bare word stays a string).
`--resume` alone means `--resume=True`.

Every value is checked before the stage does any work, and a bad one stops it with one line:
- the key must be a config key: the script's `config_keys` if it lists them, else its lower-case globals
  (names in UPPER_CASE are the script's constants);
- the value must have the default's type (an int may stand for a float). A script widens this for a key in its
  CONFIG_TYPES constant, e.g. {"image_layer": (int, list)}; None is accepted only where the default is None
  (or CONFIG_TYPES says so);
- a key in the script's POSITIVE constant must be a number > 0; a key in its CHOICES constant ({key: allowed
  values}) one of its allowed values.
"""
import ast as _ast
import builtins as _builtins
import os as _os
import sys as _sys
import traceback as _traceback


def _config_error(msg):
    _sys.exit(f"error: {msg}")


def _config_keys():
    if "config_keys" in globals():
        return list(globals()["config_keys"])
    return [k for k, v in globals().items() if not k.startswith("_") and not k.isupper() and
            isinstance(v, (int, float, bool, str, list, tuple, dict, type(None)))]


def _type_names(types):
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


def _check(_key, _value, _where):
    _known = _config_keys()
    if _key not in _known:
        _config_error(f"{_where}: unknown config key {_key!r}; known keys: {', '.join(sorted(_known))}")
    _default = globals()[_key]
    _types = globals().get("CONFIG_TYPES", {}).get(_key, (type(_default),))
    if _default is None and _key not in globals().get("CONFIG_TYPES", {}):
        return _value  # an optional setting with no type to go by
    if isinstance(_default, float) and float not in _types:
        _types = (*_types, float)
    if isinstance(_value, int) and not isinstance(_value, bool) and float in _types and int not in _types:
        _value = float(_value)
    # bool is an int to isinstance; a flag must be a bool and a count must not be one
    if type(_value) not in _types:
        _config_error(f"{_where}: {_key}={_value!r} has type {type(_value).__name__}, expected "
                      f"{_type_names(_types)} like the default {_default!r}")
    if isinstance(_value, list) and isinstance(_default, list) and _default:
        _bad = [v for v in _value if type(v) is not type(_default[0])]
        if _bad:
            _config_error(f"{_where}: {_key}={_value!r} holds {_bad[0]!r}, expected a list of "
                          f"{type(_default[0]).__name__} like the default {_default!r}")
    return _value


for _arg in _sys.argv[1:]:
    if not _arg.startswith("--"):
        if not _os.path.isfile(_arg):
            _config_error(f"{_arg}: config file not found")
        print(f"config: {_arg}")
        _ns = {}
        try:
            with open(_arg) as _f:
                _code = _builtins.compile(_f.read(), _arg, "exec")  # `compile` may be a config key
            exec(_code, {}, _ns)
        except SyntaxError as _e:
            _config_error(f"{_arg}:{_e.lineno}: syntax error ({_e.msg}); expected plain Python assignments")
        except Exception as _e:
            _line = [_f.lineno for _f in _traceback.extract_tb(_e.__traceback__) if _f.filename == _arg][-1:]
            _config_error(f"{_arg}:{_line[0] if _line else '?'}: {type(_e).__name__}: {_e}; expected plain Python "
                          "assignments")
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

for _key in globals().get("POSITIVE", ()):
    _value = globals()[_key]
    if isinstance(_value, bool) or not isinstance(_value, (int, float)) or not _value > 0:
        _config_error(f"{_key}={_value!r}; expected a number > 0")
for _key, _allowed in globals().get("CHOICES", {}).items():
    if globals()[_key] not in _allowed:
        _config_error(f"{_key}={globals()[_key]!r}; expected one of {', '.join(repr(a) for a in _allowed)}")
