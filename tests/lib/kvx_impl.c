/* kvx's implementation, compiled once per configuration of the tests and
   benchmarks (the backend defines and flags come from the command line) and
   linked into every program of that configuration that uses only kvx's
   public names. The Makefile lists the ones that compile it themselves. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define KVX_IMPLEMENTATION
#include "../../kvx.h"
