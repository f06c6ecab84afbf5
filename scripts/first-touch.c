/* The cost of first-touching fresh anonymous pages 132 KiB apart (as pool
 * slots are), back to back and after the machine sat idle: separates the
 * page-fault path from the balloon's free page reporting (pages freed and
 * idle for ~2 s go back to the host). Used in BENCHMARKS.md:
 *   gcc -O2 scripts/first-touch.c -o /tmp/first-touch && /tmp/first-touch 3
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
/* Touch n fresh pages 132 KiB apart, as pool slots are; return ns/page. */
static double touch(size_t n){
  size_t slot=132*1024, len=slot*n;
  char*p=mmap(0,len,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  double t0=now(); for(size_t i=0;i<n;i++) p[i*slot+slot-4096]=1; double t1=now();
  munmap(p,len);
  return (t1-t0)/n;
}
int main(int argc,char**argv){
  size_t n=4096; int pause=argc>1?atoi(argv[1]):3;
  for(int r=0;r<4;r++){
    double hot=0; for(int i=0;i<5;i++) hot+=touch(n); hot/=5;
    sleep(pause);
    double cold=touch(n);
    printf("back-to-back %.0f ns/page; after %d s idle %.0f ns/page\n",hot,pause,cold);
  }
}
