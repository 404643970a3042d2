# A small TOML renderer without nixpkgs: top-level keys whose values are strings,
# integers, booleans or lists of strings. Used by the module (and evaluated by the test
# suite, which loads its output in `narq daemon`).
settings:
let
  esc = s: builtins.replaceStrings [ "\\" "\"" "\n" "\t" ] [ "\\\\" "\\\"" "\\n" "\\t" ] s;
  value = v:
    if builtins.isString v || builtins.isPath v then "\"${esc (toString v)}\""
    else if builtins.isBool v then (if v then "true" else "false")
    else if builtins.isInt v then toString v
    else if builtins.isList v then "[" + builtins.concatStringsSep ", " (map value v) + "]"
    else throw "narq: cannot render ${builtins.typeOf v} as TOML";
  keys = builtins.filter (k: settings.${k} != null) (builtins.attrNames settings);
in
builtins.concatStringsSep "" (map (k: "${k} = ${value settings.${k}}\n") keys)
