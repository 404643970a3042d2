# A small TOML renderer without nixpkgs: top-level keys whose values are strings,
# integers, booleans or lists of strings, and tables (attribute sets) of such keys after them. Used by the module (and evaluated by the test
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
  lines = set: builtins.concatStringsSep "" (map (k: "${k} = ${value set.${k}}\n")
    (builtins.filter (k: set.${k} != null && !builtins.isAttrs set.${k}) (builtins.attrNames set)));
  tables = builtins.filter (k: builtins.isAttrs settings.${k} && lines settings.${k} != "") (builtins.attrNames settings);
in
lines settings + builtins.concatStringsSep "" (map (k: "\n[${k}]\n" + lines settings.${k}) tables)
