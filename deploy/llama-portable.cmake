# Injected into llama-cpp-python's build by the Makefile (CMAKE_PROJECT_llama_cpp_INCLUDE).
#
# A portable llama.cpp: GGML_NATIVE=OFF with GGML_BACKEND_DL=ON and GGML_CPU_ALL_VARIANTS=ON builds one
# CPU backend per x86-64 level (x64, sse42, haswell, skylakex, ..., sapphirerapids) as loadable modules,
# and ggml picks the best one for the CPU it runs on, the way distribution builds do. llama-cpp-python
# 0.3.36 installs only the plain `ggml-cpu` target, so the variant modules would be built and then left
# behind; this installs them next to libllama.so, where services/stages/llm/llama_runtime.py loads them from.
# The call is deferred to the end of the top-level CMakeLists, when every target exists.
function(voxpipe_install_cpu_variants)
    get_property(targets DIRECTORY ${CMAKE_SOURCE_DIR}/vendor/llama.cpp/ggml/src PROPERTY BUILDSYSTEM_TARGETS)
    foreach(target IN LISTS targets)
        get_target_property(kind ${target} TYPE)
        if(target MATCHES "^ggml-cpu-" AND kind MATCHES "^(MODULE|SHARED)_LIBRARY$")
            install(TARGETS ${target}
                    LIBRARY DESTINATION ${SKBUILD_PLATLIB_DIR}/llama_cpp/lib
                    RUNTIME DESTINATION ${SKBUILD_PLATLIB_DIR}/llama_cpp/lib)
        endif()
    endforeach()
endfunction()
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL voxpipe_install_cpu_variants)
