// Floor: CPU cost of 70-byte writes to N loopback TCP sockets, bursts at R/s, epoll reader on another core.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
static int N, R, SECS; static int *cli;
static void pin(int c){cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);sched_setaffinity(0,sizeof s,&s);}
static void* reader(void*a){pin(1);int ep=epoll_create1(0);for(int i=0;i<N;i++){struct epoll_event e={.events=EPOLLIN,.data.fd=cli[i]};epoll_ctl(ep,EPOLL_CTL_ADD,cli[i],&e);}
 struct epoll_event ev[256];char buf[65536];for(;;){int n=epoll_wait(ep,ev,256,-1);for(int i=0;i<n;i++)read(ev[i].data.fd,buf,sizeof buf);}return 0;}
int main(int argc,char**argv){N=atoi(argv[1]);R=atoi(argv[2]);SECS=atoi(argv[3]);int nodelay=1;
 int l=socket(AF_INET,SOCK_STREAM,0);struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001)};bind(l,(void*)&a,sizeof a);listen(l,4096);socklen_t al=sizeof a;getsockname(l,(void*)&a,&al);
 cli=malloc(N*sizeof(int));int*srv=malloc(N*sizeof(int));
 for(int i=0;i<N;i++){cli[i]=socket(AF_INET,SOCK_STREAM,0);connect(cli[i],(void*)&a,sizeof a);srv[i]=accept(l,0,0);setsockopt(srv[i],IPPROTO_TCP,TCP_NODELAY,&nodelay,sizeof nodelay); if(getenv("CC")) setsockopt(srv[i],IPPROTO_TCP,TCP_CONGESTION,getenv("CC"),strlen(getenv("CC")));}
 pthread_t t;pthread_create(&t,0,reader,0);pin(0);char msg[70];memset(msg,'x',70);
 struct rusage r0,r1;getrusage(RUSAGE_THREAD,&r0);long total=0;
 for(int s=0;s<SECS*R;s++){for(int i=0;i<N;i++){write(srv[i],msg,70);total++;}usleep(1000000/R);}
 getrusage(RUSAGE_THREAD,&r1);double cpu=(r1.ru_utime.tv_sec-r0.ru_utime.tv_sec)+(r1.ru_stime.tv_sec-r0.ru_stime.tv_sec)+1e-6*((r1.ru_utime.tv_usec-r0.ru_utime.tv_usec)+(r1.ru_stime.tv_usec-r0.ru_stime.tv_usec));
 printf("N=%d R=%d writes=%ld writer_cpu_s=%.2f writes_per_cpu_s=%.0f\n",N,R,total,cpu,total/cpu);return 0;}
