# Configuration: every assignment is validated by kconfig/tree.py (kconfiglib).

DEFCONFIGS := $(filter-out fragments,$(sort $(notdir $(wildcard defconfigs/*))))
DEFCONFIG_TARGETS := $(addprefix defconfig-,$(DEFCONFIGS))

.PHONY: $(DEFCONFIG_TARGETS) menuconfig olddefconfig savedefconfig list-defconfigs

## defconfig-<name>: load defconfigs/<name> strictly, write .config and config.py
$(DEFCONFIG_TARGETS): defconfig-%: $(CORE)
	@$(PY) -m kbuild defconfig $*

## menuconfig: edit .config in a terminal menu, then regenerate config.py
menuconfig: $(CORE)
	@KCONFIG_CONFIG=.config $(PY) -m menuconfig Kconfig
	@$(PY) -m kbuild syncconfig || { echo "fix the values above with 'make menuconfig'"; exit 2; }

## olddefconfig: update .config to the current Kconfig tree (new symbols get defaults)
olddefconfig: $(CORE)
	@$(PY) -m kbuild olddefconfig

## savedefconfig: write the minimal form of .config to ./defconfig
savedefconfig: $(CORE)
	@$(PY) -m kbuild savedefconfig --out defconfig

## list-defconfigs: list the presets in defconfigs/ and the fragments, with their descriptions
list-defconfigs: $(CORE)
	@$(PY) -m kbuild list-defconfigs
