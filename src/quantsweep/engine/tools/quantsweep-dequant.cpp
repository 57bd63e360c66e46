// quantsweep-dequant: rows of GGUF tensors as float32, dequantized by the engine's own ggml
// (each type's to_float, ik-only types included), for quantsweep's quantization-error proxy.
//
//   quantsweep-dequant FILE.gguf < REQUESTS > ROWS.f32
//
// REQUESTS: one line per request, "<tensor name> <first row> <rows>", rows counted over the
// tensor's rows of every matrix (row r of a 3-D tensor is row r % ne1 of matrix r / ne1).
// Output: each request's rows, ne0 float32 each, little-endian, in request order. Errors: one
// line on stderr naming the file and tensor, exit code 1. Built with the engine, against its ggml.
#include "ggml.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static int fail(const std::string & msg) {
    fprintf(stderr, "quantsweep-dequant: %s\n", msg.c_str());
    return 1;
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        return fail("usage: quantsweep-dequant FILE.gguf < 'TENSOR FIRST_ROW ROWS' lines > rows.f32");
    }
    const char * fname = argv[1];
    struct ggml_context * meta = nullptr;
    struct gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ &meta};
    struct gguf_context * gg = gguf_init_from_file(fname, params);
    if (!gg || !meta) {
        return fail(std::string(fname) + ": not a readable GGUF");
    }
    FILE * f = fopen(fname, "rb");
    if (!f) {
        return fail(std::string(fname) + ": cannot open");
    }
    const size_t data = gguf_get_data_offset(gg);
    char name[512];
    long long first = 0, count = 0;
    std::vector<uint8_t> raw;
    std::vector<float> out;
    while (scanf("%511s %lld %lld", name, &first, &count) == 3) {
        const int idx = gguf_find_tensor(gg, name);
        struct ggml_tensor * t = ggml_get_tensor(meta, name);
        if (idx < 0 || !t) {
            return fail(std::string(fname) + ": no tensor " + name);
        }
        const int64_t ne0 = t->ne[0];
        const int64_t nrows = ggml_nrows(t);
        if (first < 0 || count < 0 || first + count > nrows) {
            return fail(std::string(fname) + ": " + name + " has " + std::to_string(nrows) + " rows, asked for rows " +
                        std::to_string(first) + ".." + std::to_string(first + count));
        }
        const ggml_type type = t->type;
        const size_t row_bytes = ggml_row_size(type, ne0);
        const ggml_type_traits_t traits = ggml_internal_get_type_traits(type);
        if (type != GGML_TYPE_F32 && !traits.to_float) {
            return fail(std::string(fname) + ": " + name + ": type " + ggml_type_name(type) + " has no dequantizer");
        }
        raw.resize(row_bytes * count);
        const size_t offset = data + gguf_get_tensor_offset(gg, idx) + row_bytes * first;
        if (fseeko(f, (off_t) offset, SEEK_SET) != 0 || fread(raw.data(), 1, raw.size(), f) != raw.size()) {
            return fail(std::string(fname) + ": " + name + ": truncated (rows end past the file's end)");
        }
        out.resize(ne0 * count);
        for (int64_t r = 0; r < count; ++r) {
            const uint8_t * src = raw.data() + r * row_bytes;
            float * dst = out.data() + r * ne0;
            if (type == GGML_TYPE_F32) {
                memcpy(dst, src, ne0 * sizeof(float));
            } else {
                traits.to_float(src, dst, ne0);
            }
        }
        if (fwrite(out.data(), sizeof(float), out.size(), stdout) != out.size()) {
            return fail("writing rows failed");
        }
    }
    fflush(stdout);
    fclose(f);
    gguf_free(gg);
    ggml_free(meta);
    return 0;
}
