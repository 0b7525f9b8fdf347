# Configuration: every assignment is validated by kconfig/tree.py (kconfiglib).
# KCONFIG_CONFIG (default .config) names the configuration every target reads and writes, as in the kernel.

DEFCONFIGS := $(filter-out fragments,$(sort $(notdir $(wildcard defconfigs/*))))
DEFCONFIG_TARGETS := $(addprefix defconfig-,$(DEFCONFIGS))

.PHONY: $(DEFCONFIG_TARGETS) defconfig menuconfig nconfig guiconfig oldconfig listnewconfig alldefconfig \
	olddefconfig savedefconfig setconfig diffconfig list-defconfigs

# After a kconfiglib tool wrote the configuration: check it strictly (floats, rules) and regenerate config.py.
SYNCCONFIG = $(PY) -m kbuild syncconfig || { echo "fix the values above with 'make menuconfig'"; exit 2; }
# After a menu (menuconfig, nconfig, guiconfig): the same, but a save that fails is set aside and the
# configuration from before the edit put back.
MENUSYNC = $(PY) -m kbuild syncconfig --after-edit || exit 2

## defconfig-<name>: load defconfigs/<name> strictly, write .config and config.py
$(DEFCONFIG_TARGETS): defconfig-%: $(CORE)
	@$(PY) -m kbuild defconfig $*

## defconfig: load ./defconfig (what 'make savedefconfig' writes) strictly, write .config and config.py
defconfig: $(CORE)
	@$(PY) -m kbuild defconfig --saved ./defconfig

## menuconfig: edit .config in a terminal menu, then validate it and regenerate config.py
menuconfig: $(CORE)
	@$(PY) -m kconfig.menus menuconfig Kconfig
	@$(MENUSYNC)

## nconfig: the same terminal menu as menuconfig (kconfiglib's; it has no separate nconfig)
nconfig: $(CORE)
	@$(PY) -m kconfig.menus menuconfig Kconfig
	@$(MENUSYNC)

## guiconfig: edit .config in a Tk window (needs tkinter and a display), then validate it
guiconfig: $(CORE)
	@$(PY) -c "import tkinter" 2>/dev/null || { echo "error: make guiconfig needs tkinter, which $(PY) lacks: install it (Debian/Ubuntu: apt install python3-tk; Fedora: dnf install python3-tkinter; macOS: brew install python-tk), or use 'make menuconfig'" >&2; exit 2; }
	@$(PY) -c "import tkinter; tkinter.Tk().destroy()" 2>/dev/null || { echo "error: make guiconfig needs a display (DISPLAY is '$$DISPLAY'; over ssh use ssh -X), or use 'make menuconfig'" >&2; exit 2; }
	@$(PY) -m kconfig.menus guiconfig Kconfig
	@$(MENUSYNC)

## oldconfig: ask only for the symbols .config does not set yet (new ones), then validate it
oldconfig: $(CORE)
	@$(PY) -m kbuild oldconfig
	@$(SYNCCONFIG)

## listnewconfig: list the symbols .config does not set yet, with their defaults
listnewconfig: $(CORE)
	@$(PY) -m listnewconfig Kconfig

## alldefconfig: write a .config with every symbol at its default, then validate it
alldefconfig: $(CORE)
	@$(PY) -m alldefconfig Kconfig
	@$(SYNCCONFIG)

## olddefconfig: update .config to the current Kconfig tree (new symbols get defaults)
olddefconfig: $(CORE)
	@$(PY) -m kbuild olddefconfig

## savedefconfig: write the minimal form of .config to ./defconfig
savedefconfig: $(CORE)
	@$(PY) -m kbuild savedefconfig --out defconfig

## setconfig: write SET="SYM=value ..." into .config, strictly (the previous one kept as .config.old)
setconfig: $(CORE)
	@$(PY) -m kbuild setconfig

## diffconfig: A=<x> B=<y> (.config files, run or plan directories; default .config.old and .config), kernel form
diffconfig: $(CORE)
	@$(PY) -m kbuild diffconfig

## list-defconfigs: list the presets in defconfigs/ and the fragments, with their descriptions
list-defconfigs: $(CORE)
	@$(PY) -m kbuild list-defconfigs
