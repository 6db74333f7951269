# moe_openmp_libraries(OUT): OpenMP's imported targets for every enabled language that has
# OpenMP (C, C++), found quietly: without OpenMP, moe.h runs on the calling thread. A macro, so
# that find_package's results (OpenMP_C_FLAGS for moe.pc) reach the caller.
macro(moe_openmp_libraries out)
  get_property(_moe_languages GLOBAL PROPERTY ENABLED_LANGUAGES)
  set(_moe_components "")
  foreach(_moe_lang C CXX)
    # list(FIND), not IN_LIST: this runs under the policies of whichever project finds moe
    list(FIND _moe_languages ${_moe_lang} _moe_index)
    if(NOT _moe_index EQUAL -1)
      list(APPEND _moe_components ${_moe_lang})
    endif()
  endforeach()
  set(${out} "")
  if(_moe_components)
    find_package(OpenMP QUIET COMPONENTS ${_moe_components})
    foreach(_moe_lang IN LISTS _moe_components)
      if(OpenMP_${_moe_lang}_FOUND)
        list(APPEND ${out} OpenMP::OpenMP_${_moe_lang})
      endif()
    endforeach()
  endif()
endmacro()
