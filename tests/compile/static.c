/* KVX_STATIC: a private copy, every function static; unused ones must not warn. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define KVX_STATIC
#define KVX_IMPLEMENTATION
#include "../../kvx.h"

int main(void) { return kvx_status_name(KVX_OK)[0] == 'K' ? 0 : 1; }
