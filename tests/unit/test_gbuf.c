/* test_gbuf.c -- the wire scan that leaves a big bytes field in the received slices: a
 * ModelInferRequest packed by protobuf-c and cut into slices of every small size is unpacked
 * without field 7, which is found at the right offset and copied back byte for byte; repeated,
 * empty and missing occurrences are counted; every truncation and a wrong wire type are refused
 * (or, where the cut falls between fields, parse as the shorter message), never read past the
 * end. */
#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <stdlib.h>
#include <string.h>

#include "gbuf.h"
#include "grpc_service.pb-c.h"
#include "test.h"

#define RAW_LEN 1000

static uint8_t raw_data[RAW_LEN];

/* packs a request with nraw raw_input_contents (the first of RAW_LEN bytes) into *buf */
static size_t pack_request(uint8_t **buf, int nraw)
{
    Inference__ModelInferRequest r = INFERENCE__MODEL_INFER_REQUEST__INIT;
    Inference__ModelInferRequest__InferInputTensor t =
        INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__INIT;
    Inference__ModelInferRequest__InferInputTensor *ts[1] = {&t};
    Inference__InferParameter p = INFERENCE__INFER_PARAMETER__INIT;
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry e =
        INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__PARAMETERS_ENTRY__INIT;
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry *es[1] = {&e};
    ProtobufCBinaryData raw[2] = {{RAW_LEN, raw_data}, {3, (uint8_t *)"xyz"}};
    int64_t shape[2] = {5, 50};
    size_t n;

    for (int i = 0; i < RAW_LEN; i++)
        raw_data[i] = (uint8_t)(i * 7 + 3);
    r.model_name = "lin";
    r.id = "req-1";
    t.name = "input";
    t.datatype = "FP32";
    t.n_shape = 2;
    t.shape = shape;
    p.parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p.int64_param = -123456789;
    e.key = "shared_memory_offset";
    e.value = &p;
    t.n_parameters = 1;
    t.parameters = es;
    r.n_inputs = 1;
    r.inputs = ts;
    r.n_raw_input_contents = (size_t)nraw;
    r.raw_input_contents = raw;
    n = inference__model_infer_request__get_packed_size(&r);
    *buf = malloc(n);
    inference__model_infer_request__pack(&r, *buf);
    return n;
}

/* a byte buffer of len bytes of buf cut into slices of size step (the last one shorter) */
static grpc_byte_buffer *sliced(const uint8_t *buf, size_t len, size_t step)
{
    size_t n = len / step + 1, k = 0;
    grpc_slice *s = calloc(n, sizeof(*s));
    grpc_byte_buffer *bb;

    for (size_t off = 0; off < len; off += step)
        s[k++] = grpc_slice_from_copied_buffer((const char *)buf + off,
                                               len - off < step ? len - off : step);
    bb = grpc_raw_byte_buffer_create(s, k);
    for (size_t i = 0; i < k; i++)
        grpc_slice_unref(s[i]);
    free(s);
    return bb;
}

static void test_found_in_any_slicing(void)
{
    uint8_t *buf, copy[RAW_LEN];
    size_t len = pack_request(&buf, 1);

    for (size_t step = 1; step <= 40; step++) {
        grpc_byte_buffer *bb = sliced(buf, len, step == 40 ? len : step);
        Inference__ModelInferRequest *m;
        struct gbuf_field f;
        struct tp_err err = {0};

        ASSERT_EQ(gbuf_unpack_except(bb, &inference__model_infer_request__descriptor, 7,
                                     (ProtobufCMessage **)&m, &f, &err),
                  0);
        ASSERT_EQ(f.count, 1);
        ASSERT_EQ(f.len, RAW_LEN);
        ASSERT_EQ(memcmp(buf + f.offset, raw_data, RAW_LEN), 0);
        memset(copy, 0, sizeof(copy));
        gbuf_copy(bb, f.offset, f.len, copy);
        ASSERT_EQ(memcmp(copy, raw_data, RAW_LEN), 0);
        ASSERT_EQ(m->n_raw_input_contents, 0);
        ASSERT_STR_EQ(m->model_name, "lin");
        ASSERT_STR_EQ(m->id, "req-1");
        ASSERT_EQ(m->n_inputs, 1);
        ASSERT_EQ(m->inputs[0]->n_shape, 2);
        ASSERT_EQ(m->inputs[0]->shape[1], 50);
        ASSERT_EQ(m->inputs[0]->n_parameters, 1);
        ASSERT_EQ(m->inputs[0]->parameters[0]->value->int64_param, -123456789);
        protobuf_c_message_free_unpacked(&m->base, NULL);
        grpc_byte_buffer_destroy(bb);
    }
    free(buf);
}

static void test_counts(void)
{
    for (int nraw = 0; nraw <= 2; nraw++) {
        uint8_t *buf;
        size_t len = pack_request(&buf, nraw);
        grpc_byte_buffer *bb = sliced(buf, len, 13);
        Inference__ModelInferRequest *m;
        struct gbuf_field f;
        struct tp_err err = {0};

        ASSERT_EQ(gbuf_unpack_except(bb, &inference__model_infer_request__descriptor, 7,
                                     (ProtobufCMessage **)&m, &f, &err),
                  0);
        ASSERT_EQ(f.count, (size_t)nraw);
        ASSERT_EQ(f.len, nraw ? RAW_LEN : 0);
        protobuf_c_message_free_unpacked(&m->base, NULL);
        grpc_byte_buffer_destroy(bb);
        free(buf);
    }
}

static void test_truncated_and_malformed(void)
{
    uint8_t *buf;
    size_t len = pack_request(&buf, 1), raw_at = 0, refused = 0;
    uint8_t bad[] = {0x0a, 0x03, 'l', 'i', 'n', 0x38, 0x05}; /* field 7 as a varint */
    uint8_t group[] = {0x0a, 0x01, 'x', 0x1b, 0x1c};         /* a group */
    uint8_t longer[] = {0x3a, 0x10, 1, 2, 3};                /* 16 bytes announced, 3 there */

    for (size_t cut = 0; cut < len; cut++) {
        grpc_byte_buffer *bb = sliced(buf, cut, 5);
        Inference__ModelInferRequest *m = NULL;
        struct gbuf_field f;
        struct tp_err err = {0};

        if (gbuf_unpack_except(bb, &inference__model_infer_request__descriptor, 7,
                               (ProtobufCMessage **)&m, &f, &err) < 0) {
            ASSERT_EQ(err.code, TP_EINVAL);
            ASSERT_STR_HAS(err.msg, "malformed");
            refused++;
        } else {
            /* a cut between fields: the shorter message, with the field wholly inside it */
            ASSERT_TRUE(f.count == 0 || f.offset + f.len <= cut);
            if (f.count)
                raw_at = cut;
            protobuf_c_message_free_unpacked(&m->base, NULL);
        }
        grpc_byte_buffer_destroy(bb);
    }
    ASSERT_TRUE(refused > RAW_LEN); /* every cut inside the raw data */
    ASSERT_TRUE(raw_at == 0 || raw_at >= RAW_LEN);
    free(buf);
    {
        uint8_t *cases[3] = {bad, group, longer};
        size_t lens[3] = {sizeof(bad), sizeof(group), sizeof(longer)};

        for (int i = 0; i < 3; i++) {
            grpc_byte_buffer *bb = sliced(cases[i], lens[i], 2);
            ProtobufCMessage *m = NULL;
            struct gbuf_field f;
            struct tp_err err = {0};

            ASSERT_EQ(gbuf_unpack_except(bb, &inference__model_infer_request__descriptor, 7, &m, &f,
                                         &err),
                      -1);
            ASSERT_TRUE(m == NULL);
            grpc_byte_buffer_destroy(bb);
        }
    }
}

int main(void)
{
    TEST_RUN(test_found_in_any_slicing);
    TEST_RUN(test_counts);
    TEST_RUN(test_truncated_and_malformed);
    return 0;
}
