# nixos-module/ under the real module system (nixpkgs' lib.evalModules), as NixOS evaluates
# it, with small stand-ins for the NixOS options it sets and a stub `pkgs`. tests/it/nixos.rs
# runs:
#
#   nix-instantiate --eval --strict --json tests/nixos/eval.nix \
#     --arg lib 'import .../nixpkgs-lib/lib' --arg narq '{ enable = true; ... }'
#
# and checks the JSON: the module's options (type, default), the assertions that fail, and
# what it sets (units, nix.settings, /etc/narq/config.toml, users).
{ lib, narq }:
let
  inherit (lib) mkOption types;
  # What the module sets, declared loosely: the values are checked by the test, not here.
  loose = mkOption { type = types.attrsOf types.anything; default = { }; };
  # Units as NixOS types them where a wrong value would only show when the system is built:
  # [Service]/[Socket]/[Timer] values are bools, ints, strings or lists of them, and the
  # dependency lists are unit names.
  unitValue = types.oneOf [ types.bool types.int types.str types.path ];
  unitSection = mkOption { type = types.attrsOf (types.either unitValue (types.listOf unitValue)); default = { }; };
  unitNames = mkOption { type = types.listOf types.str; default = [ ]; };
  units = section: mkOption {
    type = types.attrsOf (types.submodule {
      freeformType = types.attrsOf types.anything;
      options = {
        ${section} = unitSection;
        description = mkOption { type = types.str; default = ""; };
        after = unitNames;
        wants = unitNames;
        requires = unitNames;
        wantedBy = unitNames;
      };
    });
    default = { };
  };
  nixosStubs = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      users.users = loose;
      users.groups = loose;
      nix.settings = loose;
      environment.etc = loose;
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      systemd.services = units "serviceConfig";
      systemd.sockets = units "socketConfig";
      systemd.timers = units "timerConfig";
    };
  };
  # A derivation as far as types.package and string interpolation care.
  fakeDrv = name: { type = "derivation"; inherit name; outPath = "/nix/store/00000000000000000000000000000000-${name}"; };
  pkgs = {
    # The text stays readable in the result (a real writeText would hide it in the store).
    writeText = name: text: fakeDrv name // { inherit text; };
  };
  eval = lib.evalModules {
    modules = [
      nixosStubs
      ../../nixos-module/default.nix
      { _module.args.pkgs = pkgs; services.narq = { package = fakeDrv "narq"; } // narq; }
    ];
  };
  inherit (eval) config options;
  # Every option under services.narq: "settings.jobs" = { type, default }.
  declared = lib.listToAttrs (map
    (o: {
      name = lib.concatStringsSep "." (lib.drop 2 o.loc);
      value = { type = o.type.description; default = if o ? default then o.default else null; };
    })
    (lib.collect lib.isOption options.services.narq));
  configFile = config.environment.etc."narq/config.toml".source or null;
in
{
  options = declared;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings users nix systemd;
  etc = builtins.attrNames config.environment.etc;
  configText = if configFile == null then null else configFile.text;
  systemPackages = map toString config.environment.systemPackages;
}
