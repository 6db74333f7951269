# moe.h — build the examples, tests and bench into build/.
#   make          everything
#   make test     the whole suite: with OpenMP, without, and under ASan+UBSan
#   make demo     train the digits classifier (the main job); build/cl_train does it on OpenCL
#   make mnist    the MNIST run (needs the MNIST IDX files, see README)
#   make embed    the game-loop example: 10,000 inferences, latency, heap_allocations=0
#   make mdn      the mixture-density example (Bishop's inverse problem), plot in build/mdn.svg
#   make mmoe     multi-task learning: shared-bottom, MMoE and PLE on the MMoE paper's synthetic data
#   make charlm   a character-level MoE language model on The Devil's Dictionary (a few minutes)
#   make bench    the benchmark
#   make cross    other platforms and compilers: aarch64 (qemu), 32-bit x86, Windows (MinGW, wine), clang
#   make code-size  bytes moe.h adds to a minimal inference program, per build option
#   make cmake-check  the CMake package (add_subdirectory, FetchContent, find_package) and moe.pc
#   make fuzz     libFuzzer on the model loader for FUZZ_SECONDS (needs clang and libclang-rt-14-dev)
CC      ?= cc
CXX     ?= c++
OPT     ?= -O2
CFLAGS  ?= $(OPT) -g
STD      = -std=c99 -Wall -Wextra -Wpedantic
OPENMP  ?= -fopenmp
LDLIBS   = -lm
# moe_cl.h opens the OpenCL loader with dlopen (in libc itself since glibc 2.34)
CL_LIBS ?= -ldl
MNIST   ?= ../shared/data/mnist
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60

EXAMPLES = build/moe build/digits build/cl_train build/embed build/mdn build/mmoe build/charlm
BENCH_ARGS ?= --shape all --mode all

.PHONY: all test demo embed mdn mmoe charlm mnist bench cross cmake-check code-size fuzz clean

all: $(EXAMPLES) build/bench_moe

build/%: examples/%.c moe.h | build
	$(CC) $(STD) $(CFLAGS) $(OPENMP) -o $@ $< $(LDLIBS)

# no -march: moe.h and the bench choose their instructions at run time
build/bench_moe: bench/bench_moe.c moe.h | build
	$(CC) $(STD) $(CFLAGS) $(OPENMP) -DMOE_BENCH_CL -o $@ bench/bench_moe.c $(LDLIBS) $(CL_LIBS)

# the digits demo on an OpenCL device (compiles digits.c itself)
build/cl_train: examples/cl_train.c examples/digits.c moe.h moe_cl.h | build
	$(CC) $(STD) $(CFLAGS) $(OPENMP) -o $@ $< $(LDLIBS) $(CL_LIBS)

build:
	mkdir -p build

test:
	sh tests/run_tests.sh

cross:
	sh tests/cross.sh

cmake-check:
	sh tests/cmake_check.sh

code-size:
	sh tests/code_size.sh

demo: build/digits
	./build/digits

# The MNIST files are gzipped; gunzip them into build/mnist first.
build/mnist/train-images-idx3-ubyte: | build
	mkdir -p build/mnist
	for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \
	  gunzip -c $(MNIST)/$$f.gz > build/mnist/$$f || exit 1; done

# the game-loop example on the model `make demo` saves (trains it first when it is missing)
embed: build/embed build/digits
	@[ -f build/digits.safetensors ] || ./build/digits
	./build/embed build/digits.safetensors

mdn: build/mdn
	./build/mdn build/mdn.svg

# multi-task learning: shared-bottom, MMoE and PLE on the MMoE paper's synthetic data
mmoe: build/mmoe
	./build/mmoe

# the MoE and its dense twin, val_bpc= and val_bpc_dense=, then a sample (CHARLM_ARGS: e.g. --router hash)
charlm: build/charlm
	./build/charlm $(CHARLM_ARGS)

mnist: build/digits build/mnist/train-images-idx3-ubyte
	./build/digits --mnist build/mnist

# every shape fwd and train (decode: fwd in f32, bf16, q8), then the table (bench/README.md)
bench: build/bench_moe
	{ ./build/bench_moe $(BENCH_ARGS); echo $$? > build/bench.status; } | tee build/bench.txt
	awk -f bench/table.awk build/bench.txt
	exit $$(cat build/bench.status)

# New inputs go to build/fuzz-corpus, crashes to build/fuzz-crash-*; tests/fuzz/corpus stays as committed.
fuzz: | build
	@command -v $(FUZZ_CC) > /dev/null 2>&1 || { echo "make fuzz: $(FUZZ_CC) not found (apt-get install -y clang libclang-rt-14-dev); skipped"; exit 0; }; \
	set -e; \
	$(FUZZ_CC) -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all tests/fuzz/fuzz_load.c -o build/fuzz_load -lm; \
	mkdir -p build/fuzz-corpus; \
	./build/fuzz_load -max_total_time=$(FUZZ_SECONDS) -timeout=20 -max_len=65536 -rss_limit_mb=2048 \
	    -dict=tests/fuzz/fuzz_load.dict -artifact_prefix=build/fuzz- build/fuzz-corpus tests/fuzz/corpus

clean:
	rm -rf build
