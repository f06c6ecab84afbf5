/* The fresh-stack path of a pool slot in C, per slot, to separate its
 * parts: guards installed 32 slots at a time with process_madvise (as the
 * pool does), then either the first-touch page fault of the top page, or
 * MADV_POPULATE_WRITE of it (vmtask-stack's `populate_top`) before the
 * touch; 4,096 slots 132 KiB apart per run, the mean of five runs per line,
 * four rounds. Used in BENCHMARKS.md:
 *   gcc -O2 scripts/populate-probe.c -o /tmp/populate-probe && /tmp/populate-probe
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#define MADV_POPULATE_WRITE 23
#define MADV_GUARD_INSTALL 102
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
#define SLOT (132*1024)
static int pid;
static void guards(char*p,size_t i){ struct iovec v[32]; for(int j=0;j<32;j++){v[j].iov_base=p+(i+j)*SLOT;v[j].iov_len=4096;}
  if(syscall(SYS_process_madvise,pid,v,32,MADV_GUARD_INSTALL,0)<0) perror("pm"); }
static double run(size_t n,int mode){
  size_t len=(size_t)SLOT*n;
  char*p=mmap(0,len,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  double t0=now();
  for(size_t i=0;i<n;i++){
    if(i%32==0) guards(p,i);
    char*top=p+i*SLOT+SLOT-4096;
    if(mode==1) madvise(top,4096,MADV_POPULATE_WRITE);
    if(mode==2) { madvise(top,4096,MADV_POPULATE_WRITE); continue; }
    if(mode==3) continue;
    top[4000]=1;
  }
  double t1=now();
  munmap(p,len);
  return (t1-t0)/n;
}
int main(){
  pid=syscall(SYS_pidfd_open,getpid(),0);
  const char*names[]={"guard32 + touch","guard32 + populate + touch","guard32 + populate, no touch","guard32 only"};
  for(int r=0;r<4;r++) for(int m=0;m<4;m++){ double s=0; for(int i=0;i<5;i++) s+=run(4096,m); printf("%-32s %.0f ns\n",names[m],s/5);} 
}
