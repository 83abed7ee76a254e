/* The one translation unit with the implementation (compiled as C99 and as
   C++), with kvx.h as its first include and no feature macros of its own. */
#define KVX_IMPLEMENTATION
#include "../../kvx.h"
#include "../../kvx.h" /* twice: harmless */

#ifdef __cplusplus
extern "C"
#endif
int kvx_compile_impl_linked(void);
int kvx_compile_impl_linked(void) { return (int)KVX_OK; }
