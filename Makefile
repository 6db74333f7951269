# moe.h — build the examples, tests and bench into build/.
#   make          everything
#   make test     the whole suite: with OpenMP, without, and under ASan+UBSan
#   make demo     train the digits classifier (the main job); build/cl_train does it on OpenCL
#   make mnist    the MNIST run (needs the MNIST IDX files, see README)
#   make bench    the benchmark
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

EXAMPLES = build/moe build/digits build/cl_train
.PHONY: all test demo mnist bench clean

all: $(EXAMPLES)

build/%: examples/%.c moe.h | build
	$(CC) $(STD) $(CFLAGS) $(OPENMP) -o $@ $< $(LDLIBS)

# the digits demo on an OpenCL device (compiles digits.c itself)
build/cl_train: examples/cl_train.c examples/digits.c moe.h moe_cl.h | build
	$(CC) $(STD) $(CFLAGS) $(OPENMP) -o $@ $< $(LDLIBS) $(CL_LIBS)

build:
	mkdir -p build

test:
	sh tests/run_tests.sh

demo: build/digits
	./build/digits

# The MNIST files are gzipped; gunzip them into build/mnist first.
build/mnist/train-images-idx3-ubyte: | build
	mkdir -p build/mnist
	for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \
	  gunzip -c $(MNIST)/$$f.gz > build/mnist/$$f || exit 1; done

mnist: build/digits build/mnist/train-images-idx3-ubyte
	./build/digits --mnist build/mnist

clean:
	rm -rf build
